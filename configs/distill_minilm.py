"""Distillation: a 3-layer student cut from a fine-tuned MiniLM-L6 teacher, on rotten_tomatoes.

  # The teacher: the README's full fine-tuning run (configs/sentiment_minilm.py).
  python -m ftjax.main --config=configs/distill_minilm.py --workdir=/tmp/student \
      --config.objective.teacher=runs/full --config.model.name_or_path=runs/full

The student is the teacher's layers (0, 2, 4) with its embeddings and head
(`model.name_or_path` = the teacher's workdir, `model.layers`; DistilBERT's
initialisation), trained on `alpha * CE + (1 - alpha) * T^2 * KL(teacher ||
student)` with the teacher's logits computed once before training
(`objective.cache_teacher`). `--config.objective.alpha=1.0` trains the same
student on the labels alone. `experiments/distill_minilm.py` runs the whole
comparison (1-4 layer students, with and without distillation).

Teacher: $FTJAX_TEACHER, else `runs/full`. Data as configs/sentiment_minilm.py.
"""

import os

from ftjax import config as config_lib


def get_config():
  config = config_lib.default_config()
  teacher = os.environ.get("FTJAX_TEACHER", "runs/full")
  config.model.name_or_path = teacher
  config.model.layers = (0, 2, 4)
  config.model.task = "classification"
  config.model.num_labels = 2
  config_lib.set_objective(config, "distill")
  config.objective.teacher = teacher
  config.objective.alpha = 0.5
  config.objective.temperature = 2.0
  config.objective.divergence = "forward_kl"
  config.objective.cache_teacher = True
  config.data.path = os.path.join(config_lib.shared_data_dir(), "rotten_tomatoes")
  config.data.max_length = 64
  config.data.num_buckets = 6
  config.strategy.name = "full"
  config.optimizer.learning_rate = 5e-5
  config.optimizer.weight_decay = 0.01
  config.training.batch_size = 32
  config.training.num_epochs = 2.0
  config.eval.splits = ("validation", "test")
  config.seed = 0
  return config
