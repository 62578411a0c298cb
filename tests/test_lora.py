"""LoRA: identity at init, merge == unmerged, export loads in PyTorch, structure, dropout.

The end-to-end checks use tiny random HF models (tests/hf_models.py) loaded
through `from_pretrained`, so the adapters are tested on the same parameter
trees real checkpoints produce.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from ftjax import models
from ftjax.errors import ConfigError
from ftjax.models import keymap, layers
from ftjax.models.bert.model import EncoderConfig
from ftjax.peft import lora
from tests import hf_models

FAMILIES = ["bert", "roberta", "distilbert"]
# Every projection of every layer: covers kernels with two input axes
# (attention/output: (heads, kv, embed)) and two output axes (query: (embed, heads, kv)).
ALL_PROJECTIONS = (r".*/attention/(query|key|value|output)", r".*/mlp/(up|down)")


def _load(model_type, tmp_path):
  pt_model = hf_models.tiny_model(model_type, "classification")
  pt_model.save_pretrained(tmp_path / "hf")
  model, params = models.from_pretrained(str(tmp_path / "hf"), task="classification")
  return model, params, hf_models.padded_batch(pt_model.config)


def _logits(model, params, inputs, dropout_seed=None):
  """Evaluation logits, or training-mode logits with dropout keyed by `dropout_seed`."""
  if dropout_seed is None:
    return np.asarray(jax.jit(lambda p: model.apply(p, **inputs).logits)(params))

  def train_logits(p, key):
    # The Rngs are made inside the trace: NNX may not advance a stream
    # created outside it.
    return model.apply(p, **inputs, deterministic=False, rngs=nnx.Rngs(dropout=key)).logits

  return np.asarray(jax.jit(train_logits)(params, jax.random.key(dropout_seed)))


def _tiny_config(model_type="bert", **overrides) -> EncoderConfig:
  config = EncoderConfig.from_hf(hf_models.TINY[model_type]().to_dict(), task="classification",
                                 num_labels=None, dtype="float32")
  return dataclasses.replace(config, **overrides)


def _randomize_lora_b(params, seed=0, std=0.5):
  """A trained-looking adapter: B away from its zero init."""
  flat = keymap.flatten(params)
  rng = np.random.RandomState(seed)
  for path in lora.lora_paths(params):
    if path.endswith("lora_b"):
      flat[path] = jnp.asarray(rng.normal(0, std, flat[path].shape), jnp.float32)
  return keymap.unflatten(flat, params)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_adapters_start_as_identity(model_type, tmp_path):
  model, params, inputs = _load(model_type, tmp_path)
  lora_model, lora_params = lora.add_lora(model, params, lora.LoraSpec(rank=4, alpha=8.0),
                                          jax.random.key(0))
  flat = keymap.flatten(lora_params)
  for path in lora.lora_paths(lora_params):
    if path.endswith("lora_a"):
      assert np.abs(flat[path]).max() > 0, path  # A random ...
    else:
      assert not np.any(flat[path]), path  # ... and B zero.
  # The base weights are the checkpoint's, untouched.
  for path, value in keymap.flatten(params).items():
    np.testing.assert_array_equal(flat[path], value)
  np.testing.assert_array_equal(_logits(lora_model, lora_params, inputs),
                                _logits(model, params, inputs))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_matches_unmerged_and_exports_to_pytorch(model_type, tmp_path):
  model, params, inputs = _load(model_type, tmp_path)
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL_PROJECTIONS)
  lora_model, lora_params = lora.add_lora(model, params, spec, jax.random.key(0))
  lora_params = _randomize_lora_b(lora_params)
  lora_logits = _logits(lora_model, lora_params, inputs)
  assert np.abs(lora_logits - _logits(model, params, inputs)).max() > 1e-3

  merged_model, merged_params = lora.merge_lora(lora_model, lora_params)
  assert merged_model.adapters == ()
  assert set(keymap.flatten(merged_params)) == set(keymap.flatten(params))
  # The fold itself, against numpy, on a kernel with two input axes.
  out = "encoder/layers/1/attention/output/"
  flat = keymap.flatten(lora_params)
  expected = flat[out + "kernel"] + 2.0 * np.einsum("hkr,re->hke", flat[out + "lora_a"],
                                                    flat[out + "lora_b"])
  np.testing.assert_allclose(keymap.flatten(merged_params)[out + "kernel"], expected, atol=1e-6)
  merged_logits = _logits(merged_model, merged_params, inputs)
  assert np.abs(merged_logits - lora_logits).max() < 1e-5

  models.save_pretrained(merged_params, merged_model.config, tmp_path / "merged")
  reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "merged", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  _, torch_logits = hf_models.torch_outputs(reloaded.eval(), inputs)
  assert np.abs(torch_logits - lora_logits).max() < 1e-4


def test_default_targets_are_query_and_value_of_every_layer():
  config = _tiny_config()
  base = models.Model.build(config)
  model = models.Model.build(config, adapters=(lora.LoraSpec(rank=4, alpha=8.0),))
  expected = {f"encoder/layers/{i}/attention/{proj}/{leaf}"
              for i in range(config.num_layers) for proj in ("query", "value")
              for leaf in ("lora_a", "lora_b")}
  assert set(lora.lora_paths(model.abstract_params)) == expected
  flat = keymap.flatten(model.abstract_params)
  heads, kv = config.num_heads, config.head_dim
  for i in range(config.num_layers):
    prefix = f"encoder/layers/{i}/attention/query/"
    assert flat[prefix + "lora_a"].shape == (config.hidden_size, 4)
    assert flat[prefix + "lora_b"].shape == (4, heads, kv)
    assert model.param_axes[prefix + "lora_a"] == ("embed", "lora")
    assert model.param_axes[prefix + "lora_b"] == ("lora", "heads", "kv")
  # Everything else is the base model's, same shapes, same axes.
  base_flat = keymap.flatten(base.abstract_params)
  for path, shape in base_flat.items():
    assert flat[path].shape == shape.shape and model.param_axes[path] == base.param_axes[path]
  assert set(flat) - set(base_flat) == expected


@pytest.mark.parametrize("targets,modules,a_axes,b_axes", [
    (ALL_PROJECTIONS[:1], ("query", "key", "value", "output"), ("heads", "kv", "lora"),
     ("lora", "embed")),
    ((r".*/mlp/up",), ("up",), ("embed", "lora"), ("lora", "mlp")),
    ((r"classifier/out",), ("out",), ("embed", "lora"), ("lora", "labels")),
])
def test_custom_targets(targets, modules, a_axes, b_axes):
  config = _tiny_config()
  model = models.Model.build(config, adapters=(lora.LoraSpec(rank=3, alpha=3.0, targets=targets),))
  paths = lora.lora_paths(model.abstract_params)
  adapted = {p.rsplit("/", 2)[-2] for p in paths}
  assert adapted == set(modules)
  # The last module listed shows the axes (for attention: output, with two input axes).
  a_path = next(p for p in paths if p.endswith(f"/{modules[-1]}/lora_a"))
  assert model.param_axes[a_path] == a_axes
  assert model.param_axes[a_path[:-1] + "b"] == b_axes
  flat = keymap.flatten(model.abstract_params)
  kernel = flat[a_path[:-len("lora_a")] + "kernel"].shape
  n_in = len(a_axes) - 1
  assert flat[a_path].shape == (*kernel[:n_in], 3)
  assert flat[a_path[:-1] + "b"].shape == (3, *kernel[n_in:])


def _layer(alpha, dropout=0.0, seed=0):
  """A query-shaped adapted layer (embed -> heads, kv) with a non-zero B."""
  layer = lora.LoraDense(6, (2, 3), axes=("embed", "heads", "kv"), init_std=0.5, rank=2,
                         alpha=alpha, dropout=dropout, dtype=jnp.float32,
                         rngs=nnx.Rngs(seed))
  layer.lora_b[...] = jax.random.normal(jax.random.key(7), layer.lora_b.shape)
  return layer


def test_scale_is_alpha_over_rank():
  x = np.random.RandomState(0).randn(4, 6).astype(np.float32)
  deltas = []
  for alpha in (3.0, 6.0):
    layer = _layer(alpha)
    w, b = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    a, b_lora = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    base = np.einsum("be,ehk->bhk", x, w) + b
    expected = base + alpha / 2 * np.einsum("be,er,rhk->bhk", x, a, b_lora)
    out = np.asarray(layer(x))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    deltas.append(out - base)
  assert np.abs(deltas[0]).max() > 1e-2
  np.testing.assert_allclose(deltas[1], 2 * deltas[0], rtol=1e-4, atol=1e-5)
  # merge_lora uses the spec's scale: doubling alpha doubles the kernel change.
  config = _tiny_config()
  params = models.Model.build(config).init(jax.random.key(0))
  changes = []
  for alpha in (3.0, 6.0):
    model, lora_params = lora.add_lora(models.Model.build(config), params,
                                       lora.LoraSpec(rank=2, alpha=alpha), jax.random.key(1))
    _, merged = lora.merge_lora(model, _randomize_lora_b(lora_params))
    q = "encoder/layers/0/attention/query/kernel"
    changes.append(keymap.flatten(merged)[q] - keymap.flatten(params)[q])
  assert np.abs(changes[0]).max() > 1e-2
  np.testing.assert_allclose(changes[1], 2 * changes[0], rtol=1e-4, atol=1e-6)


def test_adapters_get_gradients():
  """With B = 0, d loss / d B is non-zero (training can start); d loss / d A is zero."""
  config = _tiny_config(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
  model = models.Model.build(config, adapters=(lora.LoraSpec(rank=2, alpha=4.0),))
  params = model.init(jax.random.key(0))
  inputs = hf_models.padded_batch(transformers.BertConfig(vocab_size=config.vocab_size))
  grads = jax.grad(lambda p: model.apply(p, **inputs).logits.sum())(params)
  flat = keymap.flatten(grads)
  for path in lora.lora_paths(grads):
    if path.endswith("lora_b"):
      assert np.abs(flat[path]).max() > 0, path
    else:
      assert not np.any(flat[path]), path


def test_dropout_acts_on_the_adapter_path_only():
  x = np.random.RandomState(0).randn(8, 6).astype(np.float32)
  layer = _layer(4.0, dropout=0.5)
  clean = np.asarray(layer(x))  # Called as model code calls Dense: no dropout.
  np.testing.assert_array_equal(np.asarray(layer(x, deterministic=True)), clean)
  dropped = [np.asarray(layer(x, deterministic=False, rngs=nnx.Rngs(dropout=k))) for k in (0, 1)]
  assert np.abs(dropped[0] - dropped[1]).max() > 1e-3
  assert np.abs(dropped[0] - clean).max() > 1e-3
  # With B = 0 the adapter adds nothing, so dropout leaves the output exactly the base's.
  layer.lora_b[...] = jnp.zeros(layer.lora_b.shape)
  base = np.asarray(layers.Dense.__call__(layer, x))
  for k in (0, 1):
    np.testing.assert_array_equal(
        np.asarray(layer(x, deterministic=False, rngs=nnx.Rngs(dropout=k))), base)


def _no_model_dropout_lora_model(dropout):
  config = _tiny_config(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
  base = models.Model.build(config)
  params = base.init(jax.random.key(0))
  model, lora_params = lora.add_lora(base, params, lora.LoraSpec(4, 8.0, dropout=dropout),
                                     jax.random.key(1))
  inputs = hf_models.padded_batch(transformers.BertConfig(vocab_size=config.vocab_size))
  return base, params, model, lora_params, inputs


def test_model_dropout_with_zero_b_keeps_base_outputs():
  base, params, model, lora_params, inputs = _no_model_dropout_lora_model(0.5)
  for k in (0, 1):
    np.testing.assert_array_equal(
        _logits(model, lora_params, inputs, dropout_seed=k),
        _logits(base, params, inputs))


def test_model_lora_dropout_depends_on_the_key():
  """Needs the model to pass deterministic/rngs to its projections."""
  for dropout in (0.5, 0.0):
    _, _, model, lora_params, inputs = _no_model_dropout_lora_model(dropout)
    lora_params = _randomize_lora_b(lora_params)
    a, b = (_logits(model, lora_params, inputs, dropout_seed=k)
            for k in (0, 1))
    assert (np.abs(a - b).max() > 1e-4) == (dropout > 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), r"^LoRA rank 0; expected >= 1$"),
    (dict(alpha=-1.0), r"^LoRA alpha -1.0; expected > 0$"),
    (dict(dropout=1.0), r"^LoRA dropout 1.0; expected 0 <= dropout < 1$"),
    (dict(targets=("(query",)), r"^LoRA target '\(query' is not a valid regex"),
])
def test_bad_spec_is_a_config_error(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    lora.LoraSpec(**{"rank": 4, "alpha": 8.0, **kwargs})


def test_target_matching_nothing_is_a_config_error():
  config = _tiny_config()
  with pytest.raises(ConfigError, match=r"'\.\*/attention/qkv' matches no dense layer.*"
                     r"'encoder/layers/0/attention/key'") as e:
    models.Model.build(config, adapters=(lora.LoraSpec(4, 8.0, targets=(r".*/attention/qkv",)),))
  assert "\n" not in str(e.value)
  # One good target does not hide a typo in another.
  with pytest.raises(ConfigError, match="'.*/valu' matches no dense layer"):
    models.Model.build(config, adapters=(lora.LoraSpec(4, 8.0, targets=(r".*/query", r".*/valu")),))
  # A module that is not a dense layer is not a target.
  with pytest.raises(ConfigError, match="matches no dense layer"):
    models.Model.build(config, adapters=(lora.LoraSpec(4, 8.0, targets=(r".*/attention",)),))


def test_adding_twice_or_merging_nothing_is_an_error():
  config = _tiny_config()
  base = models.Model.build(config)
  params = base.init(jax.random.key(0))
  model, lora_params = lora.add_lora(base, params, lora.LoraSpec(4, 8.0), jax.random.key(1))
  with pytest.raises(ConfigError, match="already has LoRA adapters"):
    lora.add_lora(model, lora_params, lora.LoraSpec(4, 8.0), jax.random.key(1))
  with pytest.raises(ConfigError, match="has none"):
    lora.merge_lora(base, params)
