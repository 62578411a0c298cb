"""Decoder architectures at real sizes (jax.eval_shape): counts equal PyTorch's.

PyTorch builds its models on the meta device, so neither side allocates; the
configs are written out here (no hub access). Also the structure the rest of
ftjax relies on: logical axes, tied heads, RoPE scaling.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from ftjax import models
from ftjax.errors import ConfigError
from ftjax.models import keymap
from ftjax.models.llama import model as llama_model
from tests import hf_models

REAL_SIZES = {
    # name: (HF config, parameters of the causal LM as published; a tied
    # head shares the embedding's tensor and is counted once)
    "gpt2": (transformers.GPT2Config(), 124_439_808),
    "Llama-3.2-1B": (transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}), 1_235_814_400),
    "Qwen2.5-0.5B": (transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), 494_032_768),
    "Mistral-7B-v0.1": (transformers.MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        rms_norm_eps=1e-5, sliding_window=4096, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 7_241_732_096),
}


@pytest.mark.parametrize("task", ["causal_lm", "classification", "decoder"])
@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_real_size_parameter_count_equals_pytorch(name, task, tmp_path):
  hf_config, published = REAL_SIZES[name]
  hf_config.pad_token_id = 0  # Sequence classification needs one for batches.
  with torch.device("meta"):
    torch_count = sum(p.numel() for p in
                      hf_models.DECODER_CLASSES[task].from_config(hf_config).parameters())
  if task == "causal_lm":
    assert torch_count == published

  hf_config.save_pretrained(tmp_path)
  config = models.config_from_pretrained(str(tmp_path), task=task)
  model = models.Model.build(config)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(model.abstract_params))
  assert model.num_params() == torch_count


KNOWN_AXES = {"vocab", "embed", "positions", "heads", "kv_heads", "kv", "qkv", "mlp", "labels"}


@pytest.mark.parametrize("model_type", sorted(hf_models.TINY_DECODERS))
@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_every_parameter_has_logical_axes_of_its_rank(model_type, task, tmp_path):
  hf_models.TINY_DECODERS[model_type]().save_pretrained(tmp_path)
  model = models.Model.build(models.config_from_pretrained(str(tmp_path), task=task))
  shapes = keymap.flatten(model.abstract_params)
  assert set(model.param_axes) == set(shapes)
  for path, axes in model.param_axes.items():
    assert len(axes) == len(shapes[path].shape), path
    assert set(axes) <= KNOWN_AXES, (path, axes)
  axes = model.param_axes
  assert axes["embeddings/word/embedding"] == ("vocab", "embed")
  assert axes["decoder/layers/1/attention/output/kernel"] == ("heads", "kv", "embed")
  assert axes["decoder/layers/0/mlp/up/kernel"] == ("embed", "mlp")
  if model_type == "gpt2":
    assert axes["decoder/layers/0/attention/qkv/kernel"] == ("embed", "qkv", "heads", "kv")
    assert shapes["decoder/layers/0/attention/qkv/kernel"].shape == (32, 3, 4, 8)
    assert axes["final_norm/bias"] == ("embed",)
  else:
    assert axes["decoder/layers/0/attention/query/kernel"] == ("embed", "heads", "kv")
    assert axes["decoder/layers/0/attention/key/kernel"] == ("embed", "kv_heads", "kv")
    assert shapes["decoder/layers/0/attention/key/kernel"].shape[1] == 2  # GQA: 2 kv heads
    assert axes["decoder/layers/0/mlp/gate/kernel"] == ("embed", "mlp")
    assert axes["final_norm/scale"] == ("embed",)
  has_qk_norm = "decoder/layers/0/attention/query_norm/scale" in axes
  assert has_qk_norm == (model_type == "qwen3")
  if has_qk_norm:
    assert axes["decoder/layers/0/attention/key_norm/scale"] == ("kv",)
  has_qkv_bias = "decoder/layers/0/attention/query/bias" in axes
  assert has_qkv_bias == (model_type in ("qwen2", "qwen3"))
  if task == "classification":
    assert axes["classifier/out/kernel"] == ("embed", "labels")
    assert "classifier/out/bias" not in axes  # score has no bias
  tied = model.config.tie_word_embeddings
  assert ("lm_head/kernel" in axes) == (task == "causal_lm" and not tied)


def test_llama3_rope_scaling_changes_low_frequencies_only(tmp_path):
  hf_models.TINY_DECODERS["llama"]().save_pretrained(tmp_path)
  config = models.config_from_pretrained(str(tmp_path), task="causal_lm")
  assert config.rope_type == "llama3" and config.rope_theta == 500000.0
  scaled = llama_model.rope_inv_freq(config)
  default = llama_model.rope_inv_freq(
      dataclasses.replace(config, rope_type="default", rope_scaling=()))
  # head_dim 8: wavelengths 2*pi, 167, 4443, 118000. With an original context
  # of 16 (high/low frequency wavelengths 4 and 16), the first is smoothed
  # between kept and scaled, the others are divided by the factor (32).
  assert default[0] / 32 < scaled[0] < default[0]
  np.testing.assert_allclose(scaled[1:], default[1:] / 32, rtol=1e-6)


def test_config_round_trips_through_transformers(tmp_path):
  """to_hf() is a config transformers reads back as the same architecture."""
  for model_type, make in hf_models.TINY_DECODERS.items():
    make().save_pretrained(tmp_path / model_type)
    config = models.config_from_pretrained(str(tmp_path / model_type), task="classification")
    hf = transformers.AutoConfig.for_model(**config.to_hf())
    hf.save_pretrained(tmp_path / f"{model_type}-again")
    again = models.config_from_pretrained(str(tmp_path / f"{model_type}-again"),
                                          task="classification")
    assert again == config, model_type


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
])
def test_unsupported_configs_fail_in_one_line(change, message, tmp_path):
  hf = hf_models.TINY_DECODERS["llama"]().to_dict()
  hf.update(change)
  with pytest.raises(ConfigError, match=message):
    llama_model.DecoderConfig.from_hf(hf, task="causal_lm", num_labels=None, dtype="float32")


@pytest.mark.parametrize("transform, flax_shape", [
    (keymap.CONV1D, (4, 3, 2, 5)), (keymap.CONV1D_IN2, (2, 5, 4))])
def test_conv1d_transforms_invert_each_other(transform, flax_shape):
  flax_value = np.random.RandomState(0).randn(*flax_shape).astype(np.float32)
  hf_value = transform.to_hf(flax_value)
  assert hf_value.shape == transform.hf_shape(flax_shape)
  np.testing.assert_array_equal(transform.to_flax(hf_value, flax_shape), flax_value)


def test_conv1d_transform_matches_gpt2_c_attn_layout():
  """c_attn (in=embed, out=[q|k|v] of heads*kv) -> kernel[e, j, h, d] = W[e, j*H*D + h*D + d]."""
  w = np.arange(4 * 3 * 2 * 5, dtype=np.float32).reshape(4, 30)  # embed 4, heads 2, kv 5
  kernel = keymap.CONV1D.to_flax(w, (4, 3, 2, 5))
  assert kernel[3, 2, 1, 4] == w[3, 2 * 10 + 1 * 5 + 4]
