"""Adapters compose: a test-defined adapter stacked with LoRA through `ftjax.peft.adapter`.

`ChannelScale` below is an IA3-like method defined only here (a learned
per-channel scale on the outputs of some dense layers, starting at one). It
is registered like any adapter and stacked with LoRA on a tiny BERT; the
tests check the partition, the optimizer state and the merge, all through
the protocol, with no change to ftjax.
"""

import dataclasses
import subprocess
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import config as config_lib
from ftjax import models, optim
from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import keymap, layers
from ftjax.peft import adapter, hf_adapter, lora, partition

SCALE_LEAF = "channel_scale"


class ScaledDense(layers.Dense):
  """`scale * (W x + b)`, one scale per output channel."""

  @classmethod
  def from_dense(cls, dense: layers.Dense, *, rngs: nnx.Rngs) -> "ScaledDense":
    scaled = cls(dense.in_features, dense.out_features, axes=dense.axes, init_std=dense.init_std,
                 dtype=dense.dtype, param_dtype=dense.param_dtype, use_bias=dense.use_bias,
                 rngs=rngs)
    scaled.kernel, scaled.bias = dense.kernel, dense.bias
    n_in = len(dense.in_features)
    setattr(scaled, SCALE_LEAF, nnx.Param(jnp.ones(dense.out_features, dense.param_dtype),
                                          logical_axes=dense.axes[n_in:]))
    return scaled

  def __call__(self, inputs, *, deterministic=True, rngs=None):
    return super().__call__(inputs) * getattr(self, SCALE_LEAF)[...]


@dataclasses.dataclass(frozen=True)
class ChannelScale:
  """The test adapter: implements `adapter.Adapter` without subclassing anything."""

  name: ClassVar[str] = "channel_scale"
  targets: tuple[str, ...] = (r".*/mlp/up", r".*/attention/key")

  def inject(self, module, *, rngs):
    for path, _, dense in adapter.dense_targets(module, self.targets, "channel_scale"):
      adapter.replace_module(module, path, ScaledDense.from_dense(dense, rngs=rngs))

  def rules(self):
    return [(rf".*/{SCALE_LEAF}", partition.TRAINABLE)]

  def merge(self, params):
    flat = dict(params)
    for path in [p for p in flat if p.endswith("/" + SCALE_LEAF)]:
      prefix = path[:-len(SCALE_LEAF)]
      scale = flat.pop(path)  # (out...): broadcasts over the kernel's trailing output axes
      flat[prefix + "kernel"] = flat[prefix + "kernel"] * scale
      flat[prefix + "bias"] = flat[prefix + "bias"] * scale
    return flat

  def to_peft(self, model, params):
    raise CheckpointError("channel_scale has no PEFT format")


adapter.register("channel_scale", lambda strategy: ChannelScale())


def _config(num_layers=2):
  hf = {"model_type": "bert", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers":
        num_layers, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
  return models.FAMILIES["bert"].config_from_hf(hf, task="classification", num_labels=3,
                                                dtype="float32")


def _strategy(name="lora", adapters=("channel_scale",)):
  strategy = config_lib.default_config().strategy
  strategy.name = name
  strategy.lora.rank = 2
  strategy.adapters = adapters
  return strategy


def _inputs():
  rng = np.random.RandomState(0)
  attention_mask = (np.arange(8)[None, :] < np.array([[8], [5], [3]])).astype(np.int32)
  return {"input_ids": rng.randint(3, 100, (3, 8)) * attention_mask,
          "attention_mask": attention_mask}


def _logits(model, params):
  return np.asarray(jax.jit(lambda p: model.apply(p, **_inputs()).logits)(params))


@pytest.fixture(scope="module")
def stacked():
  """(base model, base params, stacked model, stacked params) of LoRA + channel_scale."""
  config = _config()
  base = models.Model.build(config)
  params = base.init(jax.random.key(0))
  model, stacked_params = adapter.add_adapters(base, params, adapter.from_config(_strategy()),
                                               jax.random.key(1))
  return base, params, model, stacked_params


def _adapter_paths(paths):
  lora_paths = {p for p in paths if p.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
  scale_paths = {p for p in paths if p.endswith("/" + SCALE_LEAF)}
  return lora_paths, scale_paths


def test_stacking_adds_both_adapters_and_keeps_the_base(stacked):
  base, params, model, stacked_params = stacked
  assert [a.name for a in model.adapters] == ["lora", "channel_scale"]
  assert model.adapters == (lora.LoraSpec(rank=2, alpha=16.0, dropout=0.0), ChannelScale())
  hash(model.adapters)  # part of the model's static description
  assert model.with_execution(layers.Execution()).adapters == model.adapters
  flat = keymap.flatten(stacked_params)
  lora_paths, scale_paths = _adapter_paths(flat)
  assert {p.rsplit("/", 2)[-2] for p in lora_paths} == {"query", "value"}
  assert {p.rsplit("/", 2)[-2] for p in scale_paths} == {"up", "key"}
  assert len(lora_paths) == 2 * 2 * 2 and len(scale_paths) == 2 * 2
  assert set(flat) - set(keymap.flatten(params)) == lora_paths | scale_paths
  assert set(adapter.adapter_paths(model)) == lora_paths | scale_paths
  for path, value in keymap.flatten(params).items():
    np.testing.assert_array_equal(flat[path], value)
  for path in scale_paths:
    np.testing.assert_array_equal(flat[path], 1.0)
  # Both start as the identity: the stacked model computes the base model's function.
  np.testing.assert_allclose(_logits(model, stacked_params), _logits(base, params), atol=1e-6)


def test_partition_trains_both_adapters_and_the_head_only(stacked):
  _, _, model, stacked_params = stacked
  paths = list(keymap.flatten(model.abstract_params))
  lora_paths, scale_paths = _adapter_paths(paths)
  head = {p for p in paths if p.startswith("classifier/")}
  assert head
  # `labels` raises on a path no rule covers: every path is covered.
  labels = partition.labels(paths, partition.strategy_rules(_strategy(), num_layers=2))
  assert {p for p, lab in labels.items() if lab == partition.TRAINABLE} == \
      lora_paths | scale_paths | head
  # head_only + the test adapter alone: its scales and the head, no LoRA.
  only_scale = partition.labels(
      [p for p in paths if p not in lora_paths],
      partition.strategy_rules(_strategy("head_only"), num_layers=2))
  assert {p for p, lab in only_scale.items() if lab == partition.TRAINABLE} == scale_paths | head
  # A frozen layer range does not freeze the adapters the run asked for.
  freeze = _strategy("freeze", ("lora", "channel_scale"))
  freeze.freeze_layers = 2
  frozen_layers = partition.labels(paths, partition.strategy_rules(freeze, num_layers=2))
  assert all(frozen_layers[p] == partition.TRAINABLE for p in lora_paths | scale_paths)
  assert frozen_layers["encoder/layers/0/attention/query/kernel"] == partition.FROZEN

  trainable, frozen = partition.split(stacked_params, labels)
  # Gradients reach both adapters (LoRA's B, the scales) while their init is the identity.
  inputs = _inputs()
  grads = jax.grad(lambda t: model.apply(partition.merge(t, frozen), **inputs).logits.sum())(
      trainable)
  flat_grads = keymap.flatten(grads)
  for path in sorted(scale_paths | {p for p in lora_paths if p.endswith("lora_b")}):
    assert np.abs(flat_grads[path]).max() > 0, path


def test_optimizer_state_holds_moments_of_the_trainable_leaves_only(stacked):
  _, _, model, stacked_params = stacked
  paths = list(keymap.flatten(model.abstract_params))
  labels = partition.labels(paths, partition.strategy_rules(_strategy(), num_layers=2))
  trainable, frozen = partition.split(stacked_params, labels)
  optimizer = optim.build(config_lib.default_config(), trainable, 1e-3)
  opt_state = optimizer.init(trainable)
  trainable_paths = {p for p, lab in labels.items() if lab == partition.TRAINABLE}
  moments = [keymap.flatten(s.mu) for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
  assert len(moments) == 1 and set(moments[0]) == trainable_paths
  trainable_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainable))
  frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen))
  # Two Adam moments per trainable leaf plus a step counter; nothing for frozen leaves.
  assert 2 * trainable_bytes <= optim.state_bytes(opt_state) <= 2 * trainable_bytes + 16
  assert frozen_bytes > 5 * trainable_bytes


def test_merge_gives_the_adapted_function_without_adapter_params(stacked):
  base, params, model, stacked_params = stacked
  flat = dict(keymap.flatten(stacked_params))
  rng = np.random.RandomState(1)
  lora_paths, scale_paths = _adapter_paths(flat)
  for path in sorted(scale_paths | {p for p in lora_paths if p.endswith("lora_b")}):
    flat[path] = jnp.asarray(flat[path] + rng.normal(0, 0.5, flat[path].shape), jnp.float32)
  trained = keymap.unflatten(flat, stacked_params)
  adapted_logits = _logits(model, trained)
  assert np.abs(adapted_logits - _logits(base, params)).max() > 1e-3

  merged_model, merged_params = adapter.merge_adapters(model, trained)
  assert merged_model.adapters == ()
  assert set(keymap.flatten(merged_params)) == set(keymap.flatten(params))
  np.testing.assert_allclose(_logits(merged_model, merged_params), adapted_logits, atol=1e-5)
  up = "encoder/layers/1/mlp/up/"
  np.testing.assert_allclose(keymap.flatten(merged_params)[up + "kernel"],
                             flat[up + "kernel"] * flat[up + SCALE_LEAF], rtol=1e-6)


def test_stacking_order_comes_from_the_config():
  names = [a.name for a in adapter.from_config(_strategy("lora", ("channel_scale", "lora")))]
  assert names == ["channel_scale", "lora"]
  assert adapter.from_config(_strategy("full", ())) == ()
  assert [a.name for a in adapter.from_config(_strategy("head_only", ("lora",)))] == ["lora"]


@pytest.mark.parametrize("adapters,message", [
    (("ia4",), r"^strategy.adapters: 'ia4' is not a registered adapter; expected one of "
               r".*channel_scale.*lora"),
    (("channel_scale", "channel_scale"), r"^strategy.adapters lists 'channel_scale' twice"),
])
def test_bad_adapter_names_are_one_line_config_errors(adapters, message):
  with pytest.raises(ConfigError, match=message) as e:
    adapter.from_config(_strategy("full", adapters))
  assert "\n" not in str(e.value)


def test_misuse_is_refused(stacked, tmp_path):
  base, params, model, stacked_params = stacked
  with pytest.raises(ConfigError, match="would have 2 'channel_scale' adapters"):
    adapter.add_adapters(model, stacked_params, (ChannelScale(),), jax.random.key(0))
  with pytest.raises(TypeError, match="is not an ftjax.peft.adapter.Adapter"):
    adapter.add_adapters(base, params, ("lora",), jax.random.key(0))
  with pytest.raises(ConfigError, match="needs a model with adapters; this one has none"):
    adapter.merge_adapters(base, params)
  with pytest.raises(CheckpointError, match="holds one method; this model stacks lora, "
                     "channel_scale"):
    hf_adapter.save_adapter(model, stacked_params, tmp_path)
  with pytest.raises(ValueError, match="already registered"):
    adapter.register("channel_scale", lambda strategy: ChannelScale(targets=(".*",)))
  with pytest.raises(ConfigError, match=r"mlp/up already has a LoRA adapter"):
    models.Model.build(_config(), adapters=(lora.LoraSpec(2, 4.0, targets=(r".*/mlp/up",)),
                                            lora.LoraSpec(2, 4.0, targets=(r".*/mlp/up",))))


def test_lora_wraps_another_adapters_layer_and_keeps_its_parameters():
  """LoRA extends the layer it adapts (`adapter.extend`), whatever that layer is."""
  model = models.Model.build(_config(), adapters=(ChannelScale(), lora.LoraSpec(
      2, 4.0, targets=(r".*/mlp/up",))))
  up = "encoder/layers/0/mlp/up/"
  assert {up + leaf for leaf in ("kernel", "bias", SCALE_LEAF, "lora_a", "lora_b")} <= set(
      keymap.flatten(model.abstract_params))
  params = dict(keymap.flatten(model.init(jax.random.key(0))))
  params[up + SCALE_LEAF] = jnp.full_like(params[up + SCALE_LEAF], 2.0)
  params[up + "lora_b"] = jnp.ones_like(params[up + "lora_b"])
  module = nnx.merge(model.graphdef, keymap.unflatten(params, model.abstract_params))
  layer = module.encoder.layers[0].mlp.up
  assert adapter.mixins(layer) == (lora.LoraMixin,)
  x = np.random.RandomState(0).randn(3, 16).astype(np.float32)
  w, b = np.asarray(params[up + "kernel"]), np.asarray(params[up + "bias"])
  a = np.asarray(params[up + "lora_a"])
  expected = 2.0 * (x @ w + b) + 2.0 * (x @ a) @ np.ones((2, 32), np.float32)
  np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_models_do_not_import_peft():
  code = ("import sys, ftjax.models; "
          "print(sorted(m for m in sys.modules if m.startswith('ftjax.peft')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
