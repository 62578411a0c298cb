"""Bottleneck adapters (`ftjax.peft.bottleneck`): placement, identity at init, the layer's
formula, sharding, refusing merge and PEFT export, training, stacking with LoRA."""

import functools
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import checkpoint, models, optim, sharding, train
from ftjax import config as config_lib
from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import keymap, layers
from ftjax.peft import adapter, bottleneck, hf_adapter, lora, partition
from tests import hf_models, tiny

FAMILIES = [("bert", "classification"), ("llama", "causal_lm"), ("gpt2", "causal_lm")]
SPECS = {"houlsby": bottleneck.BottleneckSpec(size=8),
         "pfeiffer": bottleneck.BottleneckSpec(style="pfeiffer", size=8)}


@functools.cache
def _base_dir(model_type, task) -> pathlib.Path:
  folder = pathlib.Path(tempfile.mkdtemp(prefix=f"bottleneck-{model_type}-"))
  pt_model = (hf_models.tiny_model(model_type, task) if model_type in hf_models.TINY
              else hf_models.tiny_decoder(model_type, task))
  pt_model.save_pretrained(folder)
  return folder


def _load(model_type, task):
  model, params = models.from_pretrained(str(_base_dir(model_type, task)), task=task)
  config = hf_models.TINY[model_type]() if model_type in hf_models.TINY else \
      hf_models.TINY_DECODERS[model_type]()
  batch = hf_models.padded_batch(config)
  return model, params, {k: batch[k] for k in ("input_ids", "attention_mask")}


def _logits(model, params, inputs):
  return np.asarray(jax.jit(lambda p: model.apply(p, **inputs).logits)(params))


def _randomize(params, paths, seed=0, std=0.5):
  flat = dict(keymap.flatten(params))
  rng = np.random.RandomState(seed)
  for path in paths:
    flat[path] = jnp.asarray(rng.normal(0, std, flat[path].shape), jnp.float32)
  return keymap.unflatten(flat, params)


@pytest.mark.parametrize("style", sorted(SPECS))
@pytest.mark.parametrize("model_type, task", FAMILIES)
def test_fresh_adapters_compute_the_base_model(model_type, task, style):
  model, params, inputs = _load(model_type, task)
  adapted, adapted_params = adapter.add_adapters(model, params, (SPECS[style],),
                                                 jax.random.key(0))
  flat = keymap.flatten(adapted_params)
  new = set(flat) - set(keymap.flatten(params))
  assert new == set(bottleneck.bottleneck_paths(adapted_params))
  stack = "encoder" if model_type == "bert" else "decoder"
  sublayers = ("attention/output", "mlp/down") if style == "houlsby" else ("mlp/down",)
  assert new == {f"{stack}/layers/{i}/{s}/{leaf}" for i in range(2) for s in sublayers
                 for leaf in bottleneck.LEAVES}
  down = f"{stack}/layers/0/mlp/down/"
  assert flat[down + "adapter_down"].shape == (32, 8)
  assert flat[down + "adapter_up"].shape == (8, 32)
  assert adapted.param_axes[down + "adapter_down"] == ("embed", "adapter")
  assert adapted.param_axes[down + "adapter_up"] == ("adapter", "embed")
  assert adapted.param_axes[down + "adapter_down_bias"] == ("adapter",)
  assert adapted.param_axes[down + "adapter_up_bias"] == ("embed",)
  # Down-projection N(0, 0.01^2); up-projection and biases zero.
  downs = np.concatenate([np.ravel(flat[p]) for p in new if p.endswith("adapter_down")])
  assert 0.005 < downs.std() < 0.02
  for path in new - {p for p in new if p.endswith("adapter_down")}:
    assert not np.any(flat[path]), path
  for path, value in keymap.flatten(params).items():
    np.testing.assert_array_equal(flat[path], value)
  np.testing.assert_array_equal(_logits(adapted, adapted_params, inputs),
                                _logits(model, params, inputs))


def test_the_layer_adds_the_residual_bottleneck_after_its_projection():
  model, params, inputs = _load("llama", "causal_lm")
  spec = bottleneck.BottleneckSpec(size=8, activation="gelu")
  adapted, adapted_params = adapter.add_adapters(model, params, (spec,), jax.random.key(0))
  adapted_params = _randomize(adapted_params, bottleneck.bottleneck_paths(adapted_params))
  logits = _logits(adapted, adapted_params, inputs)
  assert np.abs(logits - _logits(model, params, inputs)).max() > 1e-2
  # Adapted layers still scan as one stack (and rematerialise).
  scanned = adapted.with_execution(layers.Execution(scan_groups=((0, 2),), remat="full"))
  np.testing.assert_allclose(_logits(scanned, adapted_params, inputs), logits, atol=1e-6)
  flat = {p: np.asarray(v) for p, v in keymap.flatten(adapted_params).items()}
  layer = nnx.merge(adapted.graphdef, adapted_params).decoder.layers[1].attention.output
  assert adapter.mixins(layer) == (bottleneck.BottleneckMixin,)
  o = "decoder/layers/1/attention/output/"
  x = np.random.RandomState(0).randn(2, 5, 4, 8).astype(np.float32)  # (batch, len, heads, kv)
  y = x.reshape(2, 5, 32) @ flat[o + "kernel"].reshape(32, 32)  # Llama: no bias
  h = np.asarray(jax.nn.gelu(y @ flat[o + "adapter_down"] + flat[o + "adapter_down_bias"],
                             approximate=False))
  expected = y + h @ flat[o + "adapter_up"] + flat[o + "adapter_up_bias"]
  np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_peft_export_are_refused_in_one_line(tmp_path):
  model, params, _ = _load("bert", "classification")
  adapted, adapted_params = adapter.add_adapters(model, params, (SPECS["houlsby"],),
                                                 jax.random.key(0))
  with pytest.raises(ConfigError, match=r"^bottleneck adapters cannot be merged into the base "
                     r"weights \(their relu nonlinearity is not linear\); keep the ftjax "
                     r"checkpoint and evaluate or serve it with ftjax instead$") as e:
    adapter.merge_adapters(adapted, adapted_params)
  assert "\n" not in str(e.value)
  with pytest.raises(CheckpointError, match=r"^PEFT has no bottleneck adapters, so a bottleneck "
                     r"run has no PEFT format; keep the ftjax checkpoint") as e:
    hf_adapter.save_adapter(adapted, adapted_params, tmp_path)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(style="houlsbi"), r"^bottleneck style 'houlsbi'; expected one of 'houlsby', "
                            r"'pfeiffer'$"),
    (dict(size=0), r"^bottleneck size 0; expected an integer >= 1$"),
    (dict(size=2.5), r"^bottleneck size 2.5; expected an integer >= 1$"),
    (dict(activation="relu6"), r"^bottleneck activation 'relu6' is not supported; expected one "
                               r"of \[.*'relu'.*\]$"),
])
def test_bad_specs_are_one_line_config_errors(kwargs, message):
  with pytest.raises(ConfigError, match=message) as e:
    bottleneck.BottleneckSpec(**kwargs)
  assert "\n" not in str(e.value)
  if "size" in kwargs and not isinstance(kwargs["size"], int):
    return  # the typed config refuses a float size itself
  # The same line from a run's config (`strategy.bottleneck`).
  config = config_lib.default_config()
  config.strategy.name = "bottleneck"
  for key, value in kwargs.items():
    config.strategy.bottleneck[key] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_the_adapter_axis_is_replicated_on_a_mesh():
  config = config_lib.default_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(config)
  model, _, _ = _load("llama", "causal_lm")
  adapted = models.Model.build(model.config, adapters=(SPECS["houlsby"],))
  shardings = keymap.flatten(sharding.param_shardings(config, mesh, adapted.abstract_params,
                                                      adapted.param_axes))
  o = "decoder/layers/0/attention/output/"
  assert shardings[o + "adapter_down"].spec == jax.sharding.PartitionSpec("fsdp", None)
  assert shardings[o + "adapter_up"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert shardings[o + "adapter_down_bias"].spec == jax.sharding.PartitionSpec(None)


def test_stacks_with_lora_on_the_same_projection():
  """LoRA on attention/output, wrapped by Houlsby's adapter there: both kept, both train."""
  model, params, inputs = _load("bert", "classification")
  strategy = config_lib.default_config().strategy
  strategy.name, strategy.adapters = "lora", ("bottleneck",)
  strategy.lora.targets = (r".*/attention/output",)
  strategy.bottleneck.size = 4
  adapters = adapter.from_config(strategy)
  assert [a.name for a in adapters] == ["lora", "bottleneck"]
  stacked, stacked_params = adapter.add_adapters(model, params, adapters, jax.random.key(1))
  out = "encoder/layers/0/attention/output/"
  flat = keymap.flatten(stacked_params)
  assert {out + leaf for leaf in ("kernel", "bias", "lora_a", "lora_b", *bottleneck.LEAVES)} <= \
      set(flat)
  layer = nnx.merge(stacked.graphdef, stacked_params).encoder.layers[0].attention.output
  assert adapter.mixins(layer) == (lora.LoraMixin, bottleneck.BottleneckMixin)
  np.testing.assert_allclose(_logits(stacked, stacked_params, inputs),
                             _logits(model, params, inputs), atol=1e-6)
  labels = partition.labels(list(flat), partition.strategy_rules(strategy, num_layers=2))
  trainable = {p for p, lab in labels.items() if lab == partition.TRAINABLE}
  assert trainable == (set(lora.lora_paths(stacked_params))
                       | set(bottleneck.bottleneck_paths(stacked_params))
                       | {p for p in flat if p.startswith("classifier/")})
  train_side, frozen = partition.split(stacked_params, labels)
  grads = keymap.flatten(jax.grad(lambda t: stacked.apply(
      partition.merge(t, frozen), **inputs).logits.sum())(train_side))
  for path in (out + "lora_b", out + "adapter_up", out + "adapter_up_bias"):
    assert np.abs(grads[path]).max() > 0, path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("tiny")
  return (tiny.make_model(root / "model", minilm_dir, num_layers=2),
          tiny.make_data(root / "data", data_dir))


@pytest.mark.parametrize("style", sorted(SPECS))
def test_training_trains_adapters_and_head_only_and_resumes_bitwise(tiny_dirs, tmp_path, style):
  model_dir, data_path = tiny_dirs
  config = tiny.config(model_dir, data_path, **{
      "strategy.name": "bottleneck", "strategy.bottleneck.style": style,
      "strategy.bottleneck.size": 8, "checkpoint.every_steps": 3,
      "eval.splits": ("validation",)})
  run = train.setup(config, jax.devices()[:1])
  trainable = set(keymap.flatten(run.initial_state.trainable))
  sublayers = ("attention/output", "mlp/down") if style == "houlsby" else ("mlp/down",)
  assert trainable == {f"encoder/layers/{i}/{s}/{leaf}" for i in range(2) for s in sublayers
                       for leaf in bottleneck.LEAVES} | {"classifier/out/kernel",
                                                         "classifier/out/bias"}
  moments = [keymap.flatten(s.mu) for s in jax.tree.leaves(
      run.initial_state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
  assert len(moments) == 1 and set(moments[0]) == trainable
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(run.initial_state.frozen))
  assert optim.state_bytes(run.initial_state.opt_state) < 0.01 * frozen_bytes

  train.train_and_evaluate(config, str(tmp_path / "straight"), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3,
                           devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=jax.devices()[:1])
  straight, resumed = (checkpoint.read_trainable(tmp_path / name, 6)
                       for name in ("straight", "resumed"))
  assert straight.keys() == resumed.keys()
  for path, value in straight.items():
    np.testing.assert_array_equal(resumed[path], value, err_msg=path)
  ups = [v for p, v in straight.items() if p.endswith("/adapter_up")]
  assert len(ups) == 2 * len(sublayers) and all(np.abs(v).max() > 0 for v in ups)  # trained
