"""A quantised frozen base (QLoRA): an adapter (`ftjax.peft.adapter.Adapter`) that stores
dense kernels in 4 bits (NF4) or 8 bits (int8) and dequantises them in the forward pass.

QLoRA (Dettmers et al., 2023) trains LoRA adapters over a frozen base whose
linear layers are quantised; here that is two adapters stacked on the same
dense layers, the quantised base innermost:

  --config.strategy.name=lora --config.strategy.quant.method=nf4

`strategy.quant.method != "none"` stacks "quant" first (`adapter.register`'s
`base_when`), so LoRA (or DoRA, IA3, ...) wraps the quantised layer
(`adapter.extend(extend(dense, QuantMixin), LoraMixin)`) and reads its kernel
through `kernel_value()`, which dequantises.

Methods:

  nf4   the QLoRA paper's 4-bit NormalFloat: the kernel flattened (row-major,
        ftjax's (in..., out...) layout) in blocks of `block_size` (64)
        consecutive values, each block scaled by its absmax and every value
        rounded to the nearest of the 16 NF4 values (bitsandbytes' table,
        `NF4_CODE`, with its midpoint rounding); two 4-bit codes per uint8, the
        first in the high nibble, as bitsandbytes packs them. Double
        quantisation, as QLoRA/bitsandbytes: the float32 absmax constants,
        minus their mean, are quantised again blockwise to 8 bits with
        bitsandbytes' dynamic 8-bit map (`DYNAMIC_CODE`: the values of
        `bitsandbytes.functional.create_dynamic_map()`, computed once in
        float64 and rounded to float32; bitsandbytes builds them with torch's
        float32 linspace and some entries differ by one float32 ulp), with one
        float32 absmax per block of at most `absmax_block` (256) constants,
        rounded to the nearest code (bitsandbytes' torch backend's rule; its
        CPU library sometimes picks the farther neighbour). The mean is taken
        in float64 on the host. The m absmax constants of a kernel split into
        ceil(m / 256) blocks of equal length ceil(m / ceil(m / 256)) (the last
        one shorter): bitsandbytes' blocks of 256 whenever m is a multiple of
        256 (a kernel of a multiple of 64 x 256 values) or at most 256, and a
        blocking that a reader of the arrays finds from their shapes alone.
        Storage per kernel of n values: n/2 bytes of codes, n/64 bytes of
        absmax codes, 4 bytes per 256 absmax constants and 4 bytes of offset:
        0.516 bytes per parameter, 0.258x float16.
  int8  absmax per output channel (kernel column): int8 codes
        round(w * 127 / absmax) and a float32 scale absmax * (1/127) per output
        channel (bitsandbytes' LLM.int8() weight format, without the outlier
        decomposition, which concerns activations).

Parameters, next to the layer's bias (the float `kernel` is gone):

  .../query/nf4_codes         uint8 (blocks, block_size / 2), axes ("quant_blocks", None)
  .../query/nf4_absmax        uint8 (blocks,): 8-bit codes of absmax - offset
  .../query/nf4_absmax_scale  float32 (ceil(blocks / absmax_block),), replicated
  .../query/nf4_absmax_offset float32 (): the mean of the absmax constants
  .../query/nf4_shape         uint8 (*kernel shape, 0): no bytes; its shape is
                              the kernel's, for readers of the flat parameters
                              (`merge`, `adapter.kernel_value`) that see no module
  .../query/int8_codes        int8, the kernel's shape and logical axes
  .../query/int8_scale        float32 (out...), the kernel's output axes

The forward pass dequantises in float32 (code * absmax, as bitsandbytes) and
casts to the compute dtype (`model.dtype`); XLA fuses the lookup into the
kernel's use. "quant_blocks" is a logical axis no default mesh rule names, so
the nf4 codes are replicated unless a rule (`("quant_blocks", "fsdp")`) shards
them by block; int8 codes shard like the kernel they replace. `rules()` marks
all of them frozen, and adapter rules come before the strategy's, so even
`strategy.name=full` trains only the float leaves around them (embeddings,
norms, biases, heads): no gradient or optimizer state is formed for a code
(only the user's own `strategy.rules`, which come first, could say otherwise).

Loading quantises straight from the checkpoint:
`ftjax.models.load_pretrained(..., adapters=(QuantSpec(...),))` reads the
float tensors on the host, quantises them there (numpy) and puts only the
codes on the devices (`ftjax.core.run` does this for a run's quantised base).
`convert` quantises in numpy for numpy arrays and in jax.numpy for device
arrays (`adapter.add_adapters` on a loaded float model), with identical codes
(on the CPU; an accelerator's float32 division may round the reciprocal of an
absmax differently). A GGUF checkpoint's tensors are dequantised to float32
as they are read (`ftjax.models.gguf`) and then quantised again to nf4/int8
here: llama.cpp's block formats are not reused.

Merging (`merge`) dequantises each kernel to float32 at `kernel` again; merge
order is innermost first, so a stacked LoRA then merges into the dequantised
kernel, and an exported QLoRA run (`ftjax.export`, or `adapter.merge_adapters`
then `ftjax.models.save_pretrained`) computes the QLoRA model's own logits in
PyTorch (unlike merging into a 4-bit base, PEFT's issue 2321). A quantised base
has no PEFT format (`to_peft` raises): export it merged.

Registered as "quant" (built from `strategy.quant`).
"""

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import keymap
from ftjax.peft import adapter as adapter_lib
from ftjax.peft.partition import FROZEN

METHODS = ("nf4", "int8")
# The logical axis of the nf4 blocks: replicated unless a mesh rule names it.
QUANT_AXIS = "quant_blocks"

# The 16 NF4 values (QLoRA, appendix E; bitsandbytes' `get_4bit_type("nf4")`).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def _dynamic_map() -> np.ndarray:
  """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map()`: 7 exponent
  ranges 1e-6..1 of 2**i linear steps each, signed, plus 0 and 1), in float64
  rounded once to float32, sorted."""
  values = [0.0, 1.0]
  for i in range(7):
    bounds = np.linspace(0.1, 1.0, 2 ** i + 1)
    means = (bounds[:-1] + bounds[1:]) / 2.0 * 10.0 ** (i - 6)
    values += [*means, *-means]
  assert len(values) == 256
  return np.sort(np.array(values, np.float32))


DYNAMIC_CODE = _dynamic_map()
# Rounding to the nearest code: a value goes to code i when bounds[i-1] < v <= bounds[i]
# (searchsorted side="left", as torch.bucketize in bitsandbytes).
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
_DYNAMIC_BOUNDS = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / np.float32(2)
# A floor for absmax (an all-zero block): the smallest normal float32, so a
# backend that flushes subnormals computes the same reciprocal.
_TINY = np.float32(np.finfo(np.float32).tiny)

_NF4_LEAVES = ("nf4_codes", "nf4_absmax", "nf4_absmax_scale", "nf4_absmax_offset", "nf4_shape")
_INT8_LEAVES = ("int8_codes", "int8_scale")
LEAVES = _NF4_LEAVES + _INT8_LEAVES


# --- Quantising (numpy for numpy arrays, jax.numpy otherwise) ---------------


def _xp(array):
  return np if isinstance(array, np.ndarray) else jnp


def _blockwise(xp, blocks, bounds: np.ndarray):
  """(codes uint8, absmax float32) of (n, block) values: each row scaled by the
  reciprocal of its absmax (as bitsandbytes), clipped to [-1, 1], and rounded to the
  nearest code of a sorted code book given by its midpoints `bounds`."""
  absmax = xp.max(xp.abs(blocks), axis=1)
  inverse = np.float32(1) / xp.maximum(absmax, _TINY)
  scaled = xp.clip(blocks * inverse[:, None], np.float32(-1), np.float32(1))
  codes = xp.searchsorted(xp.asarray(bounds), scaled.reshape(-1), side="left")
  return codes.astype(np.uint8).reshape(blocks.shape), absmax


def _absmax_blocking(num_constants: int, num_blocks: int) -> int:
  """The length of each block of absmax constants (the last may be shorter): equal
  blocks, so the number of blocks alone determines it."""
  return -(-num_constants // num_blocks)


def quantize_nf4(kernel, block_size: int = 64, absmax_block: int = 256) -> dict:
  """The nf4 leaves of `kernel` (numpy in, numpy out; otherwise jax.numpy).

  `kernel.size` must be a multiple of `block_size` (even).
  """
  xp = _xp(kernel)
  values = xp.asarray(kernel, np.float32).reshape(-1, block_size)
  codes, absmax = _blockwise(xp, values, _NF4_BOUNDS)
  packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
  # The offset is one number per kernel: its mean is taken in float64 on the
  # host, in both paths, so numpy and XLA (which sum in other orders) agree.
  offset = np.float32(np.mean(np.asarray(absmax, np.float64)))
  n = absmax.shape[0]
  num_scales = -(-n // absmax_block)
  length = _absmax_blocking(n, num_scales)
  centred = xp.pad(absmax - offset, (0, num_scales * length - n))  # zeros: no effect on absmax
  absmax_codes, scales = _blockwise(xp, centred.reshape(num_scales, length), _DYNAMIC_BOUNDS)
  return {"nf4_codes": packed.astype(np.uint8),
          "nf4_absmax": absmax_codes.reshape(-1)[:n],
          "nf4_absmax_scale": scales.astype(np.float32),
          "nf4_absmax_offset": xp.asarray(offset, np.float32),
          "nf4_shape": xp.zeros((*kernel.shape, 0), np.uint8)}


def dequantize_nf4(leaves: dict) -> jax.Array:
  """The float32 kernel of nf4 leaves (`quantize_nf4`'s): code * absmax, the absmax
  itself dynamic code * its block's scale + offset, as bitsandbytes dequantises."""
  packed = jnp.asarray(leaves["nf4_codes"])
  n = packed.shape[0]
  scales = jnp.asarray(leaves["nf4_absmax_scale"])
  length = _absmax_blocking(n, scales.shape[0])
  absmax = (jnp.asarray(DYNAMIC_CODE)[jnp.asarray(leaves["nf4_absmax"]).astype(jnp.int32)]
            * jnp.repeat(scales, length, total_repeat_length=scales.shape[0] * length)[:n]
            + jnp.asarray(leaves["nf4_absmax_offset"]))
  codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(n, -1).astype(jnp.int32)
  values = jnp.asarray(NF4_CODE)[codes] * absmax[:, None]
  return values.reshape(leaves["nf4_shape"].shape[:-1])


def quantize_int8(kernel, n_in: int) -> dict:
  """The int8 leaves of `kernel` with `n_in` input axes (numpy in, numpy out)."""
  xp = _xp(kernel)
  kernel = xp.asarray(kernel, np.float32)
  absmax = xp.max(xp.abs(kernel), axis=tuple(range(n_in)))
  codes = xp.round(kernel * (np.float32(127) / xp.maximum(absmax, _TINY)))
  return {"int8_codes": xp.clip(codes, -127, 127).astype(np.int8),
          # A multiplication by float32(1/127) in both paths: XLA would turn a
          # division by the constant 127 into one, and numpy would not.
          "int8_scale": (absmax * np.float32(1 / 127)).astype(np.float32)}


def dequantize_int8(leaves: dict) -> jax.Array:
  """The float32 kernel of int8 leaves: codes * scale per output channel."""
  return (jnp.asarray(leaves["int8_codes"]).astype(jnp.float32)
          * jnp.asarray(leaves["int8_scale"]))


def quantize(kernel, method: str, *, n_in: int, block_size: int = 64,
             absmax_block: int = 256) -> dict:
  """The leaves that replace `kernel` ((in..., out...), `n_in` input axes) under `method`."""
  if method == "nf4":
    return quantize_nf4(kernel, block_size, absmax_block)
  return quantize_int8(kernel, n_in)


def _method_of(flat, prefix: str) -> str | None:
  if prefix + "nf4_codes" in flat:
    return "nf4"
  if prefix + "int8_codes" in flat:
    return "int8"
  return None


def read_kernel(flat: keymap.FlatParams, prefix: str):
  """The dequantised float32 kernel of the quantised layer at `prefix`, or None
  (`adapter.register_kernel_reader`: DoRA's magnitudes over a quantised base)."""
  method = _method_of(flat, prefix)
  if method == "nf4":
    return dequantize_nf4({leaf: flat[prefix + leaf] for leaf in _NF4_LEAVES})
  if method == "int8":
    return dequantize_int8({leaf: flat[prefix + leaf] for leaf in _INT8_LEAVES})
  return None


adapter_lib.register_kernel_reader(read_kernel)


# --- The layer ---------------------------------------------------------------


class QuantMixin:
  """A dense layer whose kernel is stored quantised (`add_quant`) and dequantised in
  `kernel_value()`, inside the forward pass: the float kernel is never a parameter.

  Extends a `layers.Dense` (`adapter.extend`); adapters stacked over it (LoRA,
  DoRA) call `super().__call__` and `kernel_value()` and so see the
  dequantised kernel. Gradients reach the layer's input and those adapters;
  the codes are integers and frozen.
  """

  def add_quant(self, *, method: str, block_size: int, absmax_block: int) -> None:
    n_in = len(self.in_features)
    shape = (*self.in_features, *self.out_features)
    del self.kernel
    self.quant_method = method
    if method == "nf4":
      blocks = math.prod(shape) // block_size
      self.nf4_codes = nnx.Param(jnp.zeros((blocks, block_size // 2), jnp.uint8),
                                 logical_axes=(QUANT_AXIS, None))
      self.nf4_absmax = nnx.Param(jnp.zeros((blocks,), jnp.uint8), logical_axes=(QUANT_AXIS,))
      self.nf4_absmax_scale = nnx.Param(jnp.zeros((-(-blocks // absmax_block),), jnp.float32),
                                        logical_axes=(None,))
      self.nf4_absmax_offset = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())
      self.nf4_shape = nnx.Param(jnp.zeros((*shape, 0), jnp.uint8),
                                 logical_axes=(*self.axes, None))
    else:
      self.int8_codes = nnx.Param(jnp.zeros(shape, jnp.int8), logical_axes=self.axes)
      self.int8_scale = nnx.Param(jnp.ones(self.out_features, jnp.float32),
                                  logical_axes=self.axes[n_in:])

  def kernel_value(self) -> jax.Array:
    """The dequantised kernel, in float32 cast to the compute dtype."""
    if self.quant_method == "nf4":
      kernel = dequantize_nf4({leaf: getattr(self, leaf)[...] for leaf in _NF4_LEAVES})
    else:
      kernel = dequantize_int8({leaf: getattr(self, leaf)[...] for leaf in _INT8_LEAVES})
    return kernel.astype(self.dtype or jnp.float32)


# --- The adapter -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """A quantised base as an adapter: which dense layers, which method.

  `targets` are regexes matched with `re.fullmatch` against module paths
  (`decoder/layers/3/mlp/up`), or "all-linear" (every projection in the
  layers; embeddings and heads stay float). For nf4 every targeted kernel's
  size must be a multiple of `block_size`.
  """

  name: ClassVar[str] = "quant"
  # Transforms the base weights: `ftjax.core.run` loads it with the checkpoint
  # (`ftjax.models.load_pretrained(adapters=...)`), so no float copy of the
  # targeted kernels reaches the devices.
  transforms_base: ClassVar[bool] = True

  method: str
  targets: tuple[str, ...] = (adapter_lib.ALL_LINEAR,)
  block_size: int = 64
  absmax_block: int = 256

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    _validate(self)

  def inject(self, module: nnx.Module, *, rngs: nnx.Rngs) -> None:
    """Replaces every targeted `layers.Dense` by a quantised one, in place."""
    del rngs  # The codes come from the base kernel (`convert`), not from a key.
    for path, name, dense in adapter_lib.dense_targets(module, self.targets, "quant"):
      stacked = adapter_lib.mixins(dense)
      if stacked:
        raise ConfigError(f"{name} already has {', '.join(m.__name__ for m in stacked)}; the "
                          f"quantised base must be the innermost adapter (list 'quant' first in "
                          f"strategy.adapters)")
      shape = (*dense.in_features, *dense.out_features)
      size = math.prod(shape)
      if self.method == "nf4" and size % self.block_size:
        fits = math.gcd(size, self.block_size)
        hint = f"here {fits} would" if fits % 2 == 0 else "none can divide an odd size"
        raise ConfigError(
            f"strategy.quant.block_size={self.block_size} does not divide kernel {name!r} of "
            f"{size} values {shape}; expected a block size that divides every quantised "
            f"kernel ({hint}), or targets without it")
      layer = adapter_lib.extend(dense, QuantMixin)
      layer.add_quant(method=self.method, block_size=self.block_size,
                      absmax_block=self.absmax_block)
      adapter_lib.replace_module(module, path, layer)

  def rules(self) -> list[tuple[str, str]]:
    return [(rf".*/({'|'.join(LEAVES)})", FROZEN)]

  def convert(self, params: keymap.FlatParams) -> keymap.FlatParams:
    """Each quantised layer's `<prefix>kernel` replaced by its quantised leaves: numpy
    arrays are quantised in numpy (on the host), device arrays with jax.numpy.

    The layers are those whose leaves `params` already holds as placeholders
    (`adapter.add_adapters` initialises them, `ftjax.models.load_pretrained`
    passes their shapes); an int8 scale's shape gives the kernel's output axes.
    """
    flat = dict(params)
    codes = "nf4_codes" if self.method == "nf4" else "int8_codes"
    for prefix in _prefixes(flat, codes):
      if prefix + "kernel" not in flat:
        continue
      kernel = flat.pop(prefix + "kernel")
      n_in = kernel.ndim - (flat[prefix + "int8_scale"].ndim if self.method == "int8" else 1)
      flat.update({prefix + leaf: value for leaf, value in quantize(
          kernel, self.method, n_in=n_in, block_size=self.block_size,
          absmax_block=self.absmax_block).items()})
    return flat

  def merge(self, params: keymap.FlatParams) -> keymap.FlatParams:
    """Each quantised kernel dequantised to float32 at `<prefix>kernel` again."""
    flat = dict(params)
    leaves = _NF4_LEAVES if self.method == "nf4" else _INT8_LEAVES
    for prefix in _prefixes(flat, leaves[0]):
      kernel = read_kernel(flat, prefix)
      for leaf in leaves:
        del flat[prefix + leaf]
      flat[prefix + "kernel"] = kernel
    return flat

  def to_peft(self, model, params: keymap.FlatParams) -> tuple[dict, dict[str, np.ndarray]]:
    del model, params
    raise CheckpointError(f"a quantised base (strategy.quant.method={self.method!r}) is not a "
                          f"PEFT adapter; export the merged model (--format=merged)")


def _prefixes(flat: keymap.FlatParams, leaf: str) -> list[str]:
  """Prefixes ("decoder/layers/0/mlp/up/") of the layers holding `leaf`."""
  return [p[:-len(leaf)] for p in flat if p.endswith("/" + leaf)]


def _validate(spec: QuantSpec) -> None:
  """Raises a one-line ConfigError naming the first bad value of `spec`."""
  if spec.method not in METHODS:
    raise ConfigError(f"strategy.quant.method={spec.method!r}; expected 'nf4' or 'int8' "
                      f"('none': no quantised base)")
  if (not isinstance(spec.block_size, int) or isinstance(spec.block_size, bool)
      or spec.block_size < 2 or spec.block_size % 2):
    raise ConfigError(f"strategy.quant.block_size={spec.block_size!r}; expected a positive "
                      f"multiple of 2 (QLoRA uses 64)")
  if (not isinstance(spec.absmax_block, int) or isinstance(spec.absmax_block, bool)
      or spec.absmax_block < 1):
    raise ConfigError(f"strategy.quant.absmax_block={spec.absmax_block!r}; expected a positive "
                      f"number of absmax constants per block (QLoRA uses 256)")
  adapter_lib.check_targets(spec.targets, "quant")


def _defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # "none" (a float base), "nf4" (QLoRA) or "int8".
  c.method = "none"
  # Module-path regexes, or "all-linear": every projection in the layers.
  c.targets = (adapter_lib.ALL_LINEAR,)
  # nf4: values per absmax block; it must divide every quantised kernel's size.
  c.block_size = 64
  # nf4: absmax constants per block of the double quantisation.
  c.absmax_block = 256
  return c


def _from_strategy(strategy: ml_collections.ConfigDict) -> QuantSpec:
  s = strategy.quant
  return QuantSpec(method=s.method, targets=tuple(s.targets), block_size=s.block_size,
                   absmax_block=s.absmax_block)


adapter_lib.register("quant", _from_strategy, config=_defaults,
                     base_when=lambda strategy: strategy.quant.method != "none")
