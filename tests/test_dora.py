"""DoRA, rsLoRA and LoRA+: LoRA's variants (`ftjax.peft.lora`), against numpy and PyTorch PEFT.

DoRA (`use_dora`) and rsLoRA (`use_rslora`) runs export as PEFT adapters that
`peft.PeftModel.from_pretrained` loads with ftjax's logits, and PEFT-made
ones import back; LoRA+ scales B's updates by `strategy.lora.lr_ratio`.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

from ftjax import config as config_lib
from ftjax import models, optim
from ftjax.models import keymap
from ftjax.peft import adapter, hf_adapter, lora
from tests import hf_models

TOL = 1e-4


def _layer(dora: bool, rslora: bool = False, seed: int = 0):
  layer = lora.LoraDense(6, (2, 3), axes=("embed", "heads", "kv"), init_std=0.5, rank=4,
                         alpha=8.0, dora=dora, rslora=rslora, dtype=jnp.float32,
                         rngs=nnx.Rngs(seed))
  layer.lora_b[...] = jax.random.normal(jax.random.key(7), layer.lora_b.shape)
  layer.bias[...] = jax.random.normal(jax.random.key(8), layer.bias.shape)
  return layer


def test_dora_layer_matches_the_formula():
  """m * (W + s A B) / ||W + s A B||_col x + b, with the norm over the input axis."""
  layer = _layer(dora=True)
  layer.lora_magnitude[...] = jax.random.uniform(jax.random.key(9), (2, 3), minval=0.5,
                                                 maxval=2.0)
  x = np.random.RandomState(0).randn(5, 6).astype(np.float32)
  w, b = np.asarray(layer.kernel[...]).reshape(6, 6), np.asarray(layer.bias[...]).reshape(6)
  a, bl = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...]).reshape(4, 6)
  m = np.asarray(layer.lora_magnitude[...]).reshape(6)
  merged = w + 2.0 * a @ bl
  expected = x @ (merged * (m / np.linalg.norm(merged, axis=0))) + b
  np.testing.assert_allclose(np.asarray(layer(x)).reshape(5, 6), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scale_is_alpha_over_sqrt_rank():
  assert lora.LoraSpec(rank=16, alpha=8.0, rslora=True).scale == 2.0
  assert lora.LoraSpec(rank=16, alpha=8.0).scale == 0.5
  plain, rs = _layer(dora=False), _layer(dora=False, rslora=True)
  x = np.random.RandomState(1).randn(3, 6).astype(np.float32)
  base = np.einsum("be,ehk->bhk", x, np.asarray(plain.kernel[...])) + np.asarray(plain.bias[...])
  # alpha/sqrt(4) = 4 is twice alpha/4 = 2.
  np.testing.assert_allclose(np.asarray(rs(x)) - base, 2 * (np.asarray(plain(x)) - base),
                             rtol=1e-4, atol=1e-5)


def test_dora_starts_as_the_base_model_and_merges_exactly(tmp_path):
  pt = hf_models.tiny_model("bert", "classification")
  pt.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="classification")
  spec = lora.LoraSpec(rank=4, alpha=8.0, dora=True, targets=("all-linear",))
  dmodel, dparams = adapter.add_adapters(model, params, (spec,), jax.random.key(1))
  inputs = {k: v for k, v in hf_models.padded_batch(pt.config).items() if k != "token_type_ids"}
  base = np.asarray(model.apply(params, **inputs).logits)
  # B = 0 and m = ||W||: the DoRA model computes the base model.
  np.testing.assert_allclose(np.asarray(dmodel.apply(dparams, **inputs).logits), base,
                             atol=1e-6)
  flat = dict(keymap.flatten(dparams))
  rng = np.random.default_rng(0)
  for path in flat:
    if path.endswith(("lora_b", "lora_magnitude")):
      flat[path] = jnp.asarray(flat[path] * (path.endswith("lora_magnitude"))
                               + rng.normal(0, 0.2, flat[path].shape), jnp.float32)
  trained = keymap.unflatten(flat, dparams)
  ours = np.asarray(dmodel.apply(trained, **inputs).logits)
  # A tiny random BERT's logits are ~1e-2: the adapter moves them by ~1e-3.
  assert np.abs(ours - base).max() > 5e-4
  merged_model, merged = adapter.merge_adapters(dmodel, trained)
  np.testing.assert_allclose(np.asarray(merged_model.apply(merged, **inputs).logits), ours,
                             atol=1e-6)


CASES = [("bert", "classification", (r".*/attention/(query|value)",)),
         ("llama", "causal_lm", ("all-linear",)),
         ("gpt2", "causal_lm", (r".*/attention/qkv", r".*/mlp/down"))]


def _torch_model(model_type, task):
  if model_type in hf_models.TINY:
    return hf_models.tiny_model(model_type, task)
  return hf_models.tiny_decoder(model_type, task)


@pytest.mark.parametrize("variant", ["dora", "rslora"])
@pytest.mark.parametrize("model_type, task, targets", CASES, ids=[c[0] for c in CASES])
def test_peft_loads_ftjax_dora_and_rslora(variant, model_type, task, targets, tmp_path):
  pt_model = _torch_model(model_type, task)
  pt_model.save_pretrained(tmp_path / "base")
  model, params = models.from_pretrained(str(tmp_path / "base"), task=task)
  head = [p for p in keymap.flatten(params) if p.startswith("classifier/")]
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=targets, dora=variant == "dora",
                       rslora=variant == "rslora")
  lmodel, lparams = adapter.add_adapters(model, params, (spec,), jax.random.key(1))
  flat = dict(keymap.flatten(lparams))
  rng = np.random.default_rng(0)
  for path in flat:
    if path.endswith("lora_b") or path.endswith("lora_magnitude") or path in head:
      flat[path] = jnp.asarray(flat[path] + rng.normal(0, 0.3, flat[path].shape), jnp.float32)
  lparams = keymap.unflatten(flat, lparams)
  hf_adapter.save_adapter(lmodel, lparams, tmp_path / "adapter",
                          base_model_name_or_path=str(tmp_path / "base"), modules_to_save=head)
  written = json.loads((tmp_path / "adapter" / hf_adapter.CONFIG_FILE).read_text())
  assert (written["use_dora"], written["use_rslora"]) == (variant == "dora", variant == "rslora")

  batch = hf_models.padded_batch(pt_model.config)
  inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
  ours = np.asarray(lmodel.apply(lparams, **inputs).logits)
  base = np.asarray(model.apply(params, **inputs).logits)
  real = inputs["attention_mask"].astype(bool) if task == "causal_lm" else slice(None)
  assert np.abs(ours - base)[real].max() > 100 * TOL
  peft_model = peft.PeftModel.from_pretrained(_torch_model(model_type, task),
                                              str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = peft_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  assert np.abs(ours - theirs)[real].max() < TOL

  back_model, back_params = hf_adapter.load_adapter(model, params, tmp_path / "adapter")
  assert back_model.adapters[0].dora == (variant == "dora")
  np.testing.assert_allclose(np.asarray(back_model.apply(back_params, **inputs).logits), ours,
                             atol=1e-5)


def test_a_peft_made_dora_adapter_imports(tmp_path):
  pt_model = hf_models.tiny_decoder("llama", "causal_lm")
  pt_model.save_pretrained(tmp_path / "base")
  peft_model = peft.get_peft_model(
      hf_models.tiny_decoder("llama", "causal_lm"),
      peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "down_proj"], use_dora=True))
  torch.manual_seed(3)
  for name, p in peft_model.named_parameters():
    if "lora_B" in name or "lora_magnitude" in name:
      torch.nn.init.normal_(p, mean=1.0 if "magnitude" in name else 0.0, std=0.3)
  peft_model.save_pretrained(tmp_path / "adapter")
  batch = hf_models.padded_batch(pt_model.config)
  inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
  with torch.no_grad():
    theirs = peft_model.eval()(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  model, params = models.from_pretrained(str(tmp_path / "base"), task="causal_lm")
  dmodel, dparams = hf_adapter.load_adapter(model, params, tmp_path / "adapter")
  assert dmodel.adapters[0].dora
  ours = np.asarray(dmodel.apply(dparams, **inputs).logits)
  real = inputs["attention_mask"].astype(bool)
  assert np.abs(ours - theirs)[real].max() < TOL


def test_dora_norm_is_a_constant_in_the_backward_pass():
  """PEFT (and the DoRA paper, 4.3) detach ||W + sAB||: d out / d m is (W + sAB) x / norm."""
  layer = _layer(dora=True)
  graphdef, state = nnx.split(layer)
  x = np.random.RandomState(2).randn(3, 6).astype(np.float32)

  def out(b):
    st = dict(nnx.to_pure_dict(state))
    st["lora_b"] = b
    return jnp.sum(nnx.merge(graphdef, st)(x))

  grad = jax.grad(out)(jnp.asarray(layer.lora_b[...]))
  # With the norm as a constant the gradient is linear in the upstream: check
  # against the closed form m/||.|| * s * A^T x^T 1.
  w = np.asarray(layer.kernel[...]).reshape(6, 6)
  a, bl = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...]).reshape(4, 6)
  m = np.asarray(layer.lora_magnitude[...]).reshape(6)
  norm = np.linalg.norm(w + 2.0 * a @ bl, axis=0)
  expected = 2.0 * (a.T @ x.T @ np.ones((3, 6))) * (m / norm)
  np.testing.assert_allclose(np.asarray(grad).reshape(4, 6), expected, rtol=1e-4, atol=1e-5)


def test_lora_plus_scales_b_updates_only():
  config = config_lib.default_config()
  config.strategy.lora.lr_ratio = 16.0
  config.optimizer.weight_decay = 0.0
  trainable = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))},
               "classifier": {"kernel": jnp.ones((4, 3))}}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), trainable)
  updates = {}
  for ratio in (1.0, 16.0):
    config.strategy.lora.lr_ratio = ratio
    tx = optim.build(config, trainable, optax.constant_schedule(1e-3))
    updates[ratio], _ = tx.update(grads, tx.init(trainable), trainable)
  np.testing.assert_allclose(updates[16.0]["q"]["lora_b"], 16 * updates[1.0]["q"]["lora_b"],
                             rtol=1e-6)
  np.testing.assert_allclose(updates[16.0]["q"]["lora_a"], updates[1.0]["q"]["lora_a"])
  np.testing.assert_allclose(updates[16.0]["classifier"]["kernel"],
                             updates[1.0]["classifier"]["kernel"])


def test_variant_configs_reach_the_spec_and_bad_ratio_is_one_line():
  strategy = ml_collections.ConfigDict(config_lib.default_config().strategy.to_dict())
  strategy.name = "lora"
  strategy.lora.dora = True
  strategy.lora.rslora = True
  (spec,) = [a for a in adapter.from_config(strategy) if a.name == "lora"]
  assert spec.dora and spec.rslora
  config = config_lib.default_config()
  config.strategy.lora.lr_ratio = 0.0
  with pytest.raises(config_lib.ConfigError, match=r"strategy.lora.lr_ratio.*> 0") as e:
    config_lib.validate(config)
  assert "\n" not in str(e.value)
