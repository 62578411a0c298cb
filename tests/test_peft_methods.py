"""Every PEFT method through the real run: what trains, and a bitwise resume.

For each method (a `--config.strategy` setting, as a user writes it) a tiny
BERT classifier trains 4 steps straight through, and again stopped after step
2 and resumed; the final trainable parameters must be bitwise equal. The
trainable side must hold the method's own parameters and the head only, with
optimizer state for exactly those leaves; a quantised base's codes are frozen.
"""

import re

import jax
import numpy as np
import pytest

from ftjax import checkpoint, train
from ftjax.models import keymap
from tests import tiny

# (id, overrides, regex every trainable leaf's last path part matches).
METHODS = [
    ("dora", {"strategy.name": "lora", "strategy.lora.dora": True},
     r"lora_(a|b|magnitude)"),
    ("rslora_loraplus", {"strategy.name": "lora", "strategy.lora.rslora": True,
                         "strategy.lora.lr_ratio": 16.0}, r"lora_(a|b)"),
    ("qlora_nf4", {"strategy.name": "lora", "strategy.quant.method": "nf4"}, r"lora_(a|b)"),
    ("qlora_int8", {"strategy.name": "lora", "strategy.quant.method": "int8"}, r"lora_(a|b)"),
    ("ia3", {"strategy.name": "ia3"}, r"ia3.*"),
    ("prompt", {"strategy.name": "prompt", "strategy.prompt.num_virtual_tokens": 4}, r".*"),
    ("prefix", {"strategy.name": "prefix", "strategy.prefix.num_virtual_tokens": 4}, r".*"),
    ("prefix_projection", {"strategy.name": "prefix", "strategy.prefix.num_virtual_tokens": 4,
                           "strategy.prefix.projection": True,
                           "strategy.prefix.projection_size": 16}, r".*"),
    ("houlsby", {"strategy.name": "bottleneck", "strategy.bottleneck.style": "houlsby",
                 "strategy.bottleneck.size": 8}, r"adapter_.*"),
    ("pfeiffer", {"strategy.name": "bottleneck", "strategy.bottleneck.style": "pfeiffer",
                  "strategy.bottleneck.size": 8}, r"adapter_.*"),
]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("peft_methods")
  return (tiny.make_model(root / "model", minilm_dir, dropout=0.1),
          tiny.make_data(root / "data", data_dir))


def _final(config, workdir):
  run = train.setup(config, jax.devices()[:1])
  state = run.initial_state
  target = checkpoint.abstract({"step": state.step, "trainable": state.trainable,
                                "opt_state": state.opt_state})
  restored, _ = checkpoint.Checkpointer(workdir, config).restore(4, target)
  return keymap.flatten(jax.tree.map(np.asarray, restored["trainable"]))


@pytest.mark.parametrize("overrides, leaves", [m[1:] for m in METHODS],
                         ids=[m[0] for m in METHODS])
def test_method_trains_its_own_parameters_and_resumes_bitwise(tiny_dirs, tmp_path, overrides,
                                                              leaves):
  model_dir, data_path = tiny_dirs
  config = tiny.config(model_dir, data_path, **overrides, **{
      "training.num_steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 4,
      "eval.splits": ("validation",)})
  run = train.setup(config, jax.devices()[:1])
  trainable = keymap.flatten(run.initial_state.trainable)
  model_leaves = [p for p in trainable if not p.startswith(("classifier/", "pooler/"))]
  assert model_leaves, "the method added no trainable parameter"
  for path in model_leaves:
    assert re.fullmatch(leaves, path.rsplit("/", 1)[-1]) or "prompt" in path or \
        "prefix" in path, path
  # Optimizer moments exist for exactly the trainable leaves (Adam: mu and nu).
  moments = [x for x in jax.tree.leaves(run.initial_state.opt_state) if np.ndim(x) > 0]
  assert sorted(x.shape for x in moments) == sorted(
      [x.shape for x in trainable.values()] * 2)
  frozen = keymap.flatten(run.initial_state.frozen)
  if "strategy.quant.method" in overrides:
    codes = [p for p, x in frozen.items() if x.dtype in (np.uint8, np.int8)]
    assert codes and not any(p in trainable for p in codes)

  train.train_and_evaluate(config, str(tmp_path / "straight"), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=2,
                           devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=jax.devices()[:1])
  straight, resumed = _final(config, tmp_path / "straight"), _final(config, tmp_path / "resumed")
  assert set(straight) == set(resumed) == set(trainable)
  moved = 0
  for path, value in straight.items():
    np.testing.assert_array_equal(resumed[path], value, err_msg=path)
    moved += not np.array_equal(value, np.asarray(trainable[path]))
  assert moved == len(trainable), "every trainable leaf should have changed in 4 steps"
