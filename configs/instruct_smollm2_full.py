"""Instruction tuning: SmolLM2-135M-Instruct, every parameter trained (the LoRA config's baseline).

  python -m ftjax.main --config=configs/instruct_smollm2_full.py --workdir=/tmp/smollm2_full

Same model, data, packing and evaluation as configs/instruct_smollm2_lora.py;
full fine-tuning at a learning rate suited to it. Export the result with
`python -m ftjax.export --workdir=/tmp/smollm2_full --out=/tmp/merged`.
"""

import importlib.util
import pathlib


_spec = importlib.util.spec_from_file_location(
    "instruct_smollm2_lora", pathlib.Path(__file__).parent / "instruct_smollm2_lora.py")
_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lora)


def get_config():
  config = _lora.get_config()
  config.strategy.name = "full"
  config.optimizer.learning_rate = 5e-5
  config.optimizer.weight_decay = 0.01
  return config
