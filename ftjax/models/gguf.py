"""Reading a GGUF file (llama.cpp's one-file checkpoint) as a Hugging Face checkpoint.

A GGUF file holds metadata under llama.cpp's key names, tensors under
llama.cpp's names and layouts, many of them quantised, and the tokenizer. This
module turns it into what the rest of ftjax already reads from a Hugging Face
folder, so `keymap.import_params` needs no GGUF case:

  config, tensors = gguf.read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
  # config: a config.json dict; tensors: HF name -> float32 array, read lazily
  tokenizer = gguf.load_gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

Three things differ from a Hugging Face checkpoint and are undone here:

1. Names: `blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight`
   (the table `_LLAMA_NAMES`).
2. Quantisation: each tensor is dequantised to float32 when it is read, one at
   a time, so a 7B file never needs all its weights in float32 at once. The
   block formats are decoded by the `gguf` package (llama.cpp's own Python
   reader); `tests/test_gguf.py` checks each supported type against an
   independent decoder.
3. Rotary layout: llama.cpp's converter reorders the rows of q_proj and k_proj
   (see `_unpermute_rotary`) and this module puts them back.

GGUF holds no pickle: the file is parsed as plain binary data and memory
mapped, and nothing in it is executed. (Its chat template is a Jinja string
that transformers renders in a sandbox, and only if asked to.)
"""

import os
import pathlib
import re
from collections.abc import Iterator

import numpy as np

from ftjax.errors import CheckpointError
from ftjax.models.keymap import TensorSource

# Imported lazily so that ftjax imports without `gguf` installed.
# pylint: disable=g-import-not-at-top

_MAGIC = b"GGUF"

SUPPORTED_ARCHITECTURES = ("llama",)

# Tensor types this module reads. Each is checked in tests/test_gguf.py against
# an independent decoder (transformers' torch dequantiser, a by-hand decoding of
# the block layout, or a round trip through `gguf.quants.quantize`).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
)

# llama.cpp tensor name -> Hugging Face LlamaForCausalLM name; `{i}` is a layer.
# `output.weight` is absent when the output projection is the embedding
# matrix, and so is `lm_head.weight` then (tie_word_embeddings).
_LLAMA_NAMES = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.attn_output.bias", "model.layers.{i}.self_attn.o_proj.bias"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("blk.{i}.ffn_gate.bias", "model.layers.{i}.mlp.gate_proj.bias"),
    ("blk.{i}.ffn_up.bias", "model.layers.{i}.mlp.up_proj.bias"),
    ("blk.{i}.ffn_down.bias", "model.layers.{i}.mlp.down_proj.bias"),
)
# Llama 3.1+'s rope scaling, which llama.cpp stores as per-frequency divisors
# rather than as metadata: it becomes `rope_scaling` in the config.
_ROPE_FREQS = "rope_freqs.weight"


def _template_regex(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


_LLAMA_REGEXES = tuple((_template_regex(gguf_name), hf_name) for gguf_name, hf_name in _LLAMA_NAMES)


def _hf_name(gguf_name: str) -> str | None:
  for regex, hf_name in _LLAMA_REGEXES:
    m = regex.match(gguf_name)
    if m:
      return hf_name.replace("{i}", m.group("i")) if "{i}" in hf_name else hf_name
  return None


def is_gguf(path: str | os.PathLike) -> bool:
  """Whether `path` is a file that starts with the GGUF magic bytes."""
  path = pathlib.Path(path)
  if not path.is_file():
    return False
  with path.open("rb") as f:
    return f.read(4) == _MAGIC


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's reordering of q_proj/k_proj rows (weights or biases).

  Hugging Face's Llama rotates the two halves of each head against each other
  (`rotate_half`: dims d and d + head_dim/2 form a pair); llama.cpp rotates
  adjacent dims (2k, 2k+1). Its converter (`LlamaModel.permute` in
  convert_hf_to_gguf.py) therefore reorders each head's rows from
  [half0 | half1] to interleaved [h0[0], h1[0], h0[1], h1[1], ...]:

    w.reshape(heads, 2, head_dim // 2, ...).swapaxes(1, 2).reshape(w.shape)

  This is its inverse: split each head into (head_dim // 2, 2) pairs and put
  the pair axis first again. Rows only move, so the values (and quantisation
  error) are untouched. `read_gguf` has checked that the rows split evenly.
  """
  half = weight.shape[0] // num_heads // 2
  return (weight.reshape(num_heads, half, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def dequantize(data: np.ndarray, ggml_type) -> np.ndarray:
  """One tensor's data, as `gguf.GGUFReader` maps it, decoded to a new float32 array.

  `ggml_type` is a `gguf.GGMLQuantizationType` (or its number). Block types
  come as rows of bytes and leave as rows of values, e.g. Q4_1 (576, 360)
  uint8 -> (576, 576) float32.
  """
  from gguf import GGMLQuantizationType, quants
  ggml_type = GGMLQuantizationType(ggml_type)
  if ggml_type.name not in SUPPORTED_TYPES:
    raise CheckpointError(f"ggml type {ggml_type.name} is not supported; supported types: "
                          f"{', '.join(SUPPORTED_TYPES)}")
  # `quants.dequantize` returns F32 data as a view of the memory map: the copy
  # detaches it, so the array outlives the file and can be written to.
  return np.array(quants.dequantize(data, ggml_type), dtype=np.float32)


class GgufSource(TensorSource):
  """A GGUF file's tensors under Hugging Face names, dequantised to float32 when read.

  The file stays memory mapped; each `source[name]` decodes just that tensor,
  so memory holds one decoded tensor at a time, never the whole model.
  """

  def __init__(self, path: pathlib.Path, reader, names: dict[str, object],
               rotary_heads: dict[str, int]):
    self.path = path
    self._reader = reader  # Keeps the memory map open.
    self._tensors = names  # HF name -> gguf.ReaderTensor
    self._rotary_heads = rotary_heads  # HF name -> heads, for q_proj/k_proj

  def __getitem__(self, name: str) -> np.ndarray:
    tensor = self._tensors[name]
    array = dequantize(tensor.data, tensor.tensor_type).reshape(self.shape(name))
    if name in self._rotary_heads:
      array = _unpermute_rotary(array, self._rotary_heads[name])
    return array

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    # ggml lists dimensions fastest-moving first; numpy and PyTorch the other way.
    return tuple(int(d) for d in reversed(self._tensors[name].shape))

  def ggml_type(self, name: str) -> str:
    """How the tensor is stored in the file, e.g. "Q4_1" (for logs and tests)."""
    return self._tensors[name].tensor_type.name


def _check_file(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
  if not is_gguf(path):
    raise CheckpointError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
  return path


def _open(path: str | os.PathLike):
  try:
    import gguf
  except ImportError:
    raise CheckpointError(f"reading {path} needs the gguf package: pip install gguf") from None
  path = _check_file(path)
  try:
    return path, gguf.GGUFReader(path)
  except (ValueError, KeyError, IndexError, OSError) as e:
    raise CheckpointError(f"{path} is not a readable GGUF file: {str(e).splitlines()[0]}") from None


def _value(reader, key: str, default=None):
  """A scalar or string metadata value; float32 values as their shortest decimal."""
  from gguf import GGUFValueType
  field = reader.fields.get(key)
  if field is None:
    return default
  kind = field.types[0]
  if kind == GGUFValueType.ARRAY:
    raise CheckpointError(f"metadata {key!r} is an array in {reader.data.filename}; "
                          f"expected a single value")
  part = field.parts[field.data[0]]
  if kind == GGUFValueType.STRING:
    return bytes(part).decode("utf-8")
  if kind == GGUFValueType.BOOL:
    return bool(part[0])
  if kind == GGUFValueType.FLOAT32:
    # 1e-5 is stored as float32 0.0000099999997...: write the value the
    # model's author wrote, which is also what float32 code will read.
    return float(str(np.float32(part[0])))
  if kind == GGUFValueType.FLOAT64:
    return float(part[0])
  return int(part[0])


def _require(reader, path: pathlib.Path, key: str):
  value = _value(reader, key)
  if value is None:
    raise CheckpointError(f"{path} has no metadata {key!r}, which a llama GGUF file needs")
  return value


def _llama3_rope_scaling(rope_freqs: np.ndarray, rope_theta: float, head_dim: int,
                         path: pathlib.Path) -> dict:
  """Recovers Llama 3.1+'s `rope_scaling` from llama.cpp's `rope_freqs` tensor.

  llama.cpp's converter bakes the config's llama3 scaling into one divisor per
  rotary frequency. It reads `original_max_position_embeddings` from the top
  level of config.json, where Llama 3.x has none, so it always uses 8192, and
  every Llama 3.x release uses low_freq_factor=1, high_freq_factor=4. So the
  factor is the largest divisor, and the rest is checked, not assumed: the
  divisors are recomputed from these values and must match the file's.
  """
  factor = float(str(np.float32(rope_freqs.max())))
  scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * np.pi / inv_freq
  old_context = scaling["original_max_position_embeddings"]
  low_wavelen = old_context / scaling["low_freq_factor"]
  high_wavelen = old_context / scaling["high_freq_factor"]
  smooth = ((old_context / wavelen - scaling["low_freq_factor"])
            / (scaling["high_freq_factor"] - scaling["low_freq_factor"]))
  expected = np.where(wavelen < high_wavelen, 1.0,
                      np.where(wavelen > low_wavelen, factor,
                               1 / ((1 - smooth) / factor + smooth)))
  if rope_freqs.shape != expected.shape or not np.allclose(rope_freqs, expected, rtol=1e-4):
    raise CheckpointError(
        f"{_ROPE_FREQS} in {path} is not Llama 3 rope scaling with factor={factor}, "
        f"low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192; "
        f"its rope scaling has no Hugging Face config equivalent that ftjax knows")
  return scaling


def _rope_scaling(reader, path: pathlib.Path, arch: str) -> dict | None:
  """`rope_scaling` from the metadata llama.cpp writes for linear and YaRN scaling."""
  kind = _value(reader, f"{arch}.rope.scaling.type")
  if kind in (None, "none"):
    return None
  factor = _require(reader, path, f"{arch}.rope.scaling.factor")
  if kind == "linear":
    return {"rope_type": "linear", "factor": factor}
  if kind == "yarn":
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings":
            _require(reader, path, f"{arch}.rope.scaling.original_context_length")}
  raise CheckpointError(f"rope scaling type {kind!r} in {path} is not supported; "
                        f"supported: linear, yarn, and Llama 3's (a rope_freqs tensor)")


def read_gguf(path: str | os.PathLike) -> tuple[dict, GgufSource]:
  """A GGUF file as (config.json dict, HF tensor name -> float32 array).

  The config has the keys a Hugging Face LlamaForCausalLM config.json has,
  `tie_word_embeddings` true when the file has no separate output projection
  (then there is no `lm_head.weight` either). Fails with one line for an
  architecture other than llama, a tensor type not in `SUPPORTED_TYPES`, or a
  tensor with no Hugging Face name (a mixture-of-experts llama, say), before
  any tensor is decoded.
  """
  path, reader = _open(path)
  arch = _value(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(f"GGUF architecture {arch!r} in {path} is not supported; "
                          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

  by_name = {t.name: t for t in reader.tensors}
  for tensor in reader.tensors:
    if tensor.tensor_type.name not in SUPPORTED_TYPES:
      raise CheckpointError(
          f"tensor {tensor.name!r} in {path} is stored as {tensor.tensor_type.name}, which is "
          f"not supported; supported types: {', '.join(SUPPORTED_TYPES)}")

  hidden_size = _require(reader, path, f"{arch}.embedding_length")
  num_heads = _require(reader, path, f"{arch}.attention.head_count")
  num_kv_heads = _value(reader, f"{arch}.attention.head_count_kv", num_heads)
  head_dim = _value(reader, f"{arch}.attention.key_length", hidden_size // num_heads)
  rotary_dim = _value(reader, f"{arch}.rope.dimension_count", head_dim)
  if rotary_dim != head_dim:
    raise CheckpointError(f"{path} rotates {rotary_dim} of each head's {head_dim} dimensions; "
                          f"Hugging Face Llama rotates all of them")
  rope_theta = _value(reader, f"{arch}.rope.freq_base", 10000.0)
  if "token_embd.weight" not in by_name:
    raise CheckpointError(f"{path} has no token_embd.weight tensor")

  config = {
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "hidden_size": hidden_size,
      "intermediate_size": _require(reader, path, f"{arch}.feed_forward_length"),
      "num_hidden_layers": _require(reader, path, f"{arch}.block_count"),
      "num_attention_heads": num_heads,
      "num_key_value_heads": num_kv_heads,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": _require(reader, path, f"{arch}.attention.layer_norm_rms_epsilon"),
      "rope_theta": rope_theta,
      "rope_scaling": _rope_scaling(reader, path, arch),
      "max_position_embeddings": _require(reader, path, f"{arch}.context_length"),
      # The embedding matrix, not the metadata, says how many rows the model has.
      "vocab_size": int(by_name["token_embd.weight"].shape[1]),
      # llama.cpp writes output.weight only when it differs from the embedding.
      "tie_word_embeddings": "output.weight" not in by_name,
      "attention_bias": "blk.0.attn_q.bias" in by_name,
      "mlp_bias": "blk.0.ffn_up.bias" in by_name,
      # Absent ids stay None, as on a Hugging Face config.
      "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": _value(reader, "tokenizer.ggml.padding_token_id"),
  }

  names, rotary_heads = {}, {}
  for gguf_name, tensor in by_name.items():
    if gguf_name == _ROPE_FREQS:
      if config["rope_scaling"] is not None:
        raise CheckpointError(f"{path} has both rope scaling metadata and {_ROPE_FREQS}")
      rope_freqs = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
      config["rope_scaling"] = _llama3_rope_scaling(rope_freqs.reshape(-1), rope_theta,
                                                    head_dim, path)
      continue
    hf_name = _hf_name(gguf_name)
    if hf_name is None:
      raise CheckpointError(f"tensor {gguf_name!r} in {path} has no Hugging Face Llama name; "
                            f"only dense llama GGUF files are supported")
    names[hf_name] = tensor
    heads = (num_heads if ".self_attn.q_proj." in hf_name else
             num_kv_heads if ".self_attn.k_proj." in hf_name else None)
    if heads is not None:
      rows = int(tensor.shape[-1])  # ggml order: the last dimension is HF's first
      if rows != heads * head_dim or head_dim % 2:
        raise CheckpointError(
            f"tensor {gguf_name!r} in {path} has {rows} rows; {heads} heads of {head_dim} "
            f"dimensions (an even number) need {heads * head_dim}")
      rotary_heads[hf_name] = heads
  return config, GgufSource(path, reader, names, rotary_heads)


def load_gguf_tokenizer(path: str | os.PathLike):
  """The file's tokenizer as a transformers fast tokenizer (no remote code).

  transformers rebuilds it from the `tokenizer.ggml.*` metadata (vocabulary,
  merges, special token ids, chat template), as it does for
  `AutoTokenizer.from_pretrained(folder, gguf_file=name)`.
  """
  path = _check_file(path)
  import transformers
  try:
    return transformers.AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, trust_remote_code=False)
  except (OSError, ValueError, KeyError, NotImplementedError) as e:
    raise CheckpointError(f"no usable tokenizer in {path}: {str(e).splitlines()[0]}") from None
