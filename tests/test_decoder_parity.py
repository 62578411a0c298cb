"""Llama, Mistral, Qwen2, Qwen3, GPT-2: ftjax equals PyTorch transformers, both ways.

A tiny random HF model is saved with `save_pretrained`, loaded by ftjax and
compared on a right-padded and a left-padded batch (real tokens only: what a
model computes at padding is not defined); ftjax's export is then loaded by
transformers (no missing or unexpected keys) and compared again. Further
tests check what transformers has no direct counterpart for: the KV cache
against a full forward pass, packed segments against separate sequences.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.errors import CheckpointError
from ftjax.models import decoder, keymap
from ftjax.peft import lora
from tests import hf_models

TOL = 1e-4
CACHE_TOL = 1e-5
MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


def _real_max_diff(a, b, attention_mask):
  """Max |a - b| over real (mask == 1) tokens of (batch, seq, ...) arrays."""
  real = attention_mask.astype(bool)
  return float(np.abs(np.asarray(a)[real] - np.asarray(b)[real]).max())


def _torch(pt_model, inputs, *, left):
  """transformers' hidden states and logits; left padding needs explicit position ids."""
  if left:
    inputs = {**inputs, "position_ids": hf_models.positions(inputs["attention_mask"])}
  return hf_models.torch_outputs(pt_model, inputs)


def _ftjax(model, params, inputs):
  out = jax.jit(model.apply)(params, inputs["input_ids"], inputs["attention_mask"])
  logits = None if out.logits is None else np.asarray(out.logits)
  return [np.asarray(h) for h in out.hidden_states], logits


def _assert_close(task, mask, hidden, logits, ref_hidden, ref_logits):
  assert len(hidden) == len(ref_hidden)
  for h, ref in zip(hidden, ref_hidden, strict=True):
    assert _real_max_diff(h, ref, mask) < TOL
  if task == "causal_lm":
    assert logits.shape == ref_logits.shape
    assert _real_max_diff(logits, ref_logits, mask) < TOL
  elif task == "classification":
    assert logits.shape == (3, 3)
    assert np.abs(logits - ref_logits).max() < TOL
  else:
    assert logits is None


@pytest.mark.parametrize("model_type, task", [
    *[(m, t) for m in MODEL_TYPES for t in ("causal_lm", "classification")],
    ("llama", "decoder"), ("gpt2", "decoder")])
def test_parity_and_export_roundtrip(model_type, task, tmp_path):
  pt_model = hf_models.tiny_decoder(model_type, task)
  pt_model.save_pretrained(tmp_path / "hf")
  model, params = models.from_pretrained(str(tmp_path / "hf"), task=task)
  tied = pt_model.config.tie_word_embeddings
  assert ("lm_head" in params) == (task == "causal_lm" and not tied)
  assert len(keymap.flatten(params)) == len(list(pt_model.parameters()))

  batches = {"right": hf_models.padded_batch(pt_model.config),
             "left": hf_models.left_padded_batch(pt_model.config)}
  assert batches["right"]["attention_mask"][:, -1].min() == 0  # really right-padded
  assert batches["left"]["attention_mask"][:, 0].min() == 0    # really left-padded
  outputs = {}
  for side, inputs in batches.items():
    ref_hidden, ref_logits = _torch(pt_model, inputs, left=side == "left")
    hidden, logits = _ftjax(model, params, inputs)
    assert len(hidden) == pt_model.config.num_hidden_layers + 1
    assert all(np.isfinite(h).all() for h in hidden)  # fully masked pad rows: no NaN
    _assert_close(task, inputs["attention_mask"], hidden, logits, ref_hidden, ref_logits)
    outputs[side] = hidden, logits

  models.save_pretrained(params, model.config, tmp_path / "export")
  cls = hf_models.DECODER_CLASSES[task]
  reloaded, info = cls.from_pretrained(tmp_path / "export", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  assert type(reloaded) is type(pt_model)
  reloaded.eval()
  for side, inputs in batches.items():
    re_hidden, re_logits = _torch(reloaded, inputs, left=side == "left")
    _assert_close(task, inputs["attention_mask"], *outputs[side], re_hidden, re_logits)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3", "gpt2"])
def test_kv_cache_decode_equals_full_forward(model_type, tmp_path):
  """Prefill a left-padded prompt, then decode token by token: same logits as one pass."""
  pt_model = hf_models.tiny_decoder(model_type, "causal_lm")
  pt_model.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="causal_lm")
  prompt, new = 6, 5
  full = hf_models.left_padded_batch(pt_model.config, seq=prompt + new)
  # The prompt is left-padded; the continuation is real in every row.
  mask = np.concatenate([hf_models.left_padded_batch(pt_model.config, seq=prompt)
                         ["attention_mask"], np.ones((3, new), np.int32)], axis=1)
  ids = np.where(mask == 1, full["input_ids"], 0)
  assert mask[:, :prompt].min() == 0 and mask[:, 0].max() == 1
  apply = jax.jit(model.apply)
  reference = np.asarray(apply(params, ids, mask).logits)

  cache = model.apply(params, 3, prompt + new, method="init_cache")
  out = apply(params, ids[:, :prompt], mask[:, :prompt], cache=cache)
  assert _real_max_diff(out.logits, reference[:, :prompt], mask[:, :prompt]) < CACHE_TOL
  cache = out.cache
  for step in range(prompt, prompt + new):
    out = apply(params, ids[:, step:step + 1], mask[:, step:step + 1], cache=cache)
    assert np.abs(np.asarray(out.logits)[:, 0] - reference[:, step]).max() < CACHE_TOL
    cache = out.cache
  assert int(cache.index) == prompt + new
  np.testing.assert_array_equal(cache.mask, mask.astype(bool))
  kv_heads = getattr(pt_model.config, "num_key_value_heads", pt_model.config.num_attention_heads)
  assert cache.k[0].shape == (3, prompt + new, kv_heads, model.config.head_dim)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_packed_segments_equal_separate_sequences(model_type, tmp_path):
  pt_model = hf_models.tiny_decoder(model_type, "causal_lm")
  pt_model.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="causal_lm")
  rng = np.random.RandomState(0)
  first, second = rng.randint(3, 99, size=(1, 5)), rng.randint(3, 99, size=(1, 4))
  packed = np.concatenate([first, second, np.zeros((1, 2), int)], axis=1)
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 2])
  apply = jax.jit(model.apply)
  separate = [np.asarray(apply(params, x).logits)[0] for x in (first, second)]
  # Positions restart per segment by default; passing them gives the same.
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0]])
  for kwargs in ({}, {"positions_bt": positions}):
    logits = np.asarray(apply(params, packed, segment_ids_bt=segments, **kwargs).logits)[0]
    assert np.abs(logits[:5] - separate[0]).max() < CACHE_TOL
    assert np.abs(logits[5:9] - separate[1]).max() < CACHE_TOL
  # Without segments the second sequence would see the first: the test is not vacuous.
  unsegmented = np.asarray(apply(params, packed).logits)[0]
  assert np.abs(unsegmented[5:9] - separate[1]).max() > 1e-3


def test_segment_positions_restart_per_segment():
  segments = np.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
  np.testing.assert_array_equal(decoder.positions_from_segments(segments),
                                [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]])


def test_classification_without_pad_token_reads_last_real_token(tmp_path):
  """No pad_token_id: the last token with attention_mask == 1 (transformers allows batch 1)."""
  pt_model = hf_models.tiny_decoder("llama", "classification", pad_token_id=None)
  pt_model.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="classification")
  assert model.config.pad_token_id is None
  inputs = hf_models.padded_batch(pt_model.config)
  _, logits = _ftjax(model, params, inputs)
  for row, (ids, mask) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"])):
    real = ids[mask == 1][None]
    _, ref_logits = hf_models.torch_outputs(pt_model, {"input_ids": real})
    assert np.abs(logits[row] - ref_logits[0]).max() < TOL


def test_sliding_window_is_active_in_the_mistral_test(tmp_path):
  """The window (4) is shorter than the test batch, so it changes the output."""
  pt_model = hf_models.tiny_decoder("mistral", "causal_lm")
  pt_model.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="causal_lm")
  assert model.config.sliding_window == 4
  assert all(model.config.window(i) == 4 for i in range(model.config.num_layers))
  inputs = hf_models.padded_batch(pt_model.config)
  unwindowed = models.Model.build(dataclasses.replace(model.config, sliding_window=None))
  with_window = _ftjax(model, params, inputs)[1]
  without = _ftjax(unwindowed, params, inputs)[1]
  assert _real_max_diff(with_window, without, inputs["attention_mask"]) > 1e-3


@pytest.mark.parametrize("model_type, targets", [
    ("llama", (r".*/attention/(query|value)", r".*/mlp/gate")),
    ("gpt2", (r".*/attention/qkv",))])
def test_lora_on_decoders_merges_to_the_same_function(model_type, targets, tmp_path):
  pt_model = hf_models.tiny_decoder(model_type, "causal_lm")
  pt_model.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="causal_lm")
  lora_model, lora_params = lora.add_lora(model, params, lora.LoraSpec(rank=2, alpha=4.0,
                                                                       targets=targets),
                                          jax.random.key(0))
  flat = keymap.flatten(lora_params)
  adapters = lora.lora_paths(lora_params)
  assert adapters and all(p.startswith("decoder/layers/") for p in adapters)
  keys = iter(jax.random.split(jax.random.key(1), len(adapters)))
  flat.update({p: 0.5 * jax.random.normal(next(keys), flat[p].shape)
               for p in adapters if p.endswith("lora_b")})
  lora_params = keymap.unflatten(flat, lora_model.abstract_params)
  inputs = hf_models.padded_batch(pt_model.config)
  _, adapted = _ftjax(lora_model, lora_params, inputs)
  _, base = _ftjax(model, params, inputs)
  assert _real_max_diff(adapted, base, inputs["attention_mask"]) > 1e-3
  merged_model, merged_params = lora.merge_lora(lora_model, lora_params)
  _, merged = _ftjax(merged_model, merged_params, inputs)
  assert _real_max_diff(merged, adapted, inputs["attention_mask"]) < CACHE_TOL


def test_bfloat16_compute_stays_close_to_float32(tmp_path):
  pt_model = hf_models.tiny_decoder("qwen3", "causal_lm")
  pt_model.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="causal_lm")
  bf16_model, _ = models.from_pretrained(str(tmp_path), task="causal_lm", dtype="bfloat16")
  inputs = hf_models.left_padded_batch(pt_model.config)
  out = jax.jit(bf16_model.apply)(params, inputs["input_ids"], inputs["attention_mask"])
  assert out.logits.dtype == jnp.bfloat16
  _, logits = _ftjax(model, params, inputs)
  diff = _real_max_diff(np.asarray(out.logits, np.float32), logits, inputs["attention_mask"])
  assert 0 < diff < 0.05 * np.abs(logits).max()


def test_loading_a_qwen3_tensor_into_llama_names_it(tmp_path):
  """One key table serves the family; a tensor the variant lacks is an error, not a skip."""
  pt_model = hf_models.tiny_decoder("qwen3", "causal_lm", head_dim=8, attention_bias=False)
  pt_model.save_pretrained(tmp_path)
  config = pt_model.config.to_dict()
  config["model_type"] = "llama"
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"q_norm\.weight"):
    models.from_pretrained(str(tmp_path), task="causal_lm")


def test_features_then_classify_equals_the_forward_pass(tmp_path):
  """Head-only training on cached features computes what the full model computes."""
  pt_model = hf_models.tiny_decoder("qwen2", "classification")
  pt_model.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="classification")
  inputs = hf_models.left_padded_batch(pt_model.config)
  _, logits = _ftjax(model, params, inputs)
  features = model.apply(params, inputs["input_ids"], inputs["attention_mask"],
                         method="features")
  assert features.shape == (3, 32)
  np.testing.assert_allclose(model.apply(params, features, method="classify"), logits,
                             atol=1e-6)


def test_classifier_from_a_causal_lm_checkpoint(tmp_path, caplog):
  """An untied LM checkpoint loads for classification: lm_head skipped, only score is new."""
  pt_model = hf_models.tiny_decoder("mistral", "causal_lm")
  pt_model.save_pretrained(tmp_path)
  with caplog.at_level("INFO"):
    model, params = models.from_pretrained(str(tmp_path), task="classification", num_labels=5)
  messages = [r.getMessage() for r in caplog.records]
  new_lines = [m for m in messages if "Newly initialized" in m]
  assert len(new_lines) == 1 and new_lines[0].endswith(": classifier/out/kernel")
  assert any("Not used" in m and "lm_head.weight" in m for m in messages)
  inputs = hf_models.padded_batch(pt_model.config)
  hidden, logits = _ftjax(model, params, inputs)
  ref_hidden, _ = hf_models.torch_outputs(pt_model, inputs)
  assert _real_max_diff(hidden[-1], ref_hidden[-1], inputs["attention_mask"]) < TOL
  assert logits.shape == (3, 5) and np.isfinite(logits).all()


def test_gpt2_checkpoint_with_mask_buffers_and_no_prefix_loads(tmp_path):
  """OpenAI-converted GPT-2 files: bare names plus attn.bias / attn.masked_bias buffers."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  pt_model = hf_models.tiny_decoder("gpt2", "decoder")
  pt_model.save_pretrained(tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  assert "wte.weight" in tensors  # the bare model's names carry no "transformer." prefix
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  tensors["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  model, params = models.from_pretrained(str(tmp_path), task="causal_lm")
  inputs = hf_models.padded_batch(pt_model.config)
  _, logits = _ftjax(model, params, inputs)
  hidden, _ = hf_models.torch_outputs(pt_model, inputs)
  # The tied head: logits are the last hidden state against the token embeddings.
  expected = hidden[-1] @ pt_model.wte.weight.detach().numpy().T
  assert _real_max_diff(logits, expected, inputs["attention_mask"]) < TOL


def test_explicit_attention_with_dropout_matches_the_fused_path():
  """The path used for attention dropout equals jax.nn.dot_product_attention at rate ~0."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  q = rng.randn(2, 5, 4, 8).astype(np.float32)
  k, v = (rng.randn(2, 5, 2, 8).astype(np.float32) for _ in range(2))  # 2 kv heads for 4
  ctx = decoder.context(np.zeros((2, 5), int), np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
                        None, None, None)
  mask = ctx.mask(window=3)
  fused = decoder.attention(q, k, v, mask, scale=0.3, dropout=nnx.Dropout(0.0),
                            deterministic=True, rngs=None)
  explicit = decoder.attention(q, k, v, mask, scale=0.3, dropout=nnx.Dropout(1e-9),
                               deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert np.isfinite(np.asarray(explicit)).all()
  # Row 0's first two slots are padding with no visible key: compare real queries.
  np.testing.assert_allclose(np.asarray(explicit)[0, 2:], np.asarray(fused)[0, 2:], atol=1e-6)
  np.testing.assert_allclose(np.asarray(explicit)[1], np.asarray(fused)[1], atol=1e-6)
  dropped = decoder.attention(q, k, v, mask, scale=0.3, dropout=nnx.Dropout(0.5),
                              deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert np.abs(np.asarray(dropped) - np.asarray(fused)).max() > 1e-3


def test_gpt2_dropout_applies_only_when_training(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  pt_model = hf_models.tiny_decoder("gpt2", "causal_lm")
  pt_model.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="causal_lm")
  ids = hf_models.padded_batch(pt_model.config)["input_ids"]
  evaluation = model.apply(params, ids).logits
  again = model.apply(params, ids, deterministic=True, rngs=nnx.Rngs(dropout=1)).logits
  training = model.apply(params, ids, deterministic=False, rngs=nnx.Rngs(dropout=1)).logits
  np.testing.assert_array_equal(evaluation, again)
  assert np.isfinite(np.asarray(training)).all()
  assert np.abs(np.asarray(training) - np.asarray(evaluation)).max() > 1e-3
