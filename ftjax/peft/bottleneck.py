"""Bottleneck adapters (`ftjax.peft.adapter.Adapter`): a small residual MLP after a sublayer.

A bottleneck adapter (Houlsby et al., 2019, "Parameter-Efficient Transfer
Learning for NLP") maps the output `y` of a sublayer's last projection
through a narrow MLP and adds it back:

  y + up(act(down(y)))      down: hidden -> size, up: size -> hidden

inside the sublayer, so it acts before the residual add and the norm. Two
placements (`style`):

  houlsby    after the attention output projection and after the MLP's
             down-projection of every layer (two adapters per layer)
  pfeiffer   after the MLP's down-projection only (Pfeiffer et al., 2021,
             "AdapterFusion"; their variant's extra re-use of the layer norm is
             not modelled)

Each adapter is a mixin on that projection (`attention/output`,
`mlp/down`: the same names in BERT, Llama and GPT-2), so its parameters sit
beside the projection's weights:

  encoder/layers/3/mlp/down/adapter_down        (embed, adapter)
  encoder/layers/3/mlp/down/adapter_down_bias   (adapter,)
  encoder/layers/3/mlp/down/adapter_up          (adapter, embed)
  encoder/layers/3/mlp/down/adapter_up_bias     (embed,)

`adapter` is a logical axis no sharding rule names (replicated: it is
small). The down-projection starts as N(0, 0.01^2) (Houlsby et al.'s
near-identity init, AdapterHub's "bert" init), the up-projection and both
biases at zero: a freshly adapted model computes exactly its base model's
function, and the up-projection's gradient is nonzero from the first step.
Where the sublayer applies dropout to its projection (BERT, GPT-2), the
adapter acts before that dropout.

The nonlinearity makes the adapter impossible to fold into the base weights:
`merge` refuses (keep the ftjax checkpoint and evaluate it with ftjax), and
PEFT has no bottleneck adapters, so there is no PEFT export either.

Registered as "bottleneck" (built from `strategy.bottleneck`;
`strategy.name="bottleneck"` trains the adapters and the head).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import keymap, layers
from ftjax.peft import adapter as adapter_lib
from ftjax.peft.partition import TRAINABLE

# The logical axis of the bottleneck dimension; no sharding rule names it,
# so it is replicated.
ADAPTER_AXIS = "adapter"
LEAVES = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")
# Module-path regexes of the projections each style adapts.
STYLES = {
    "houlsby": (r".*/attention/output", r".*/mlp/down"),
    "pfeiffer": (r".*/mlp/down",),
}
DOWN_INIT_STD = 1e-2


@dataclasses.dataclass(frozen=True)
class BottleneckSpec:
  """Bottleneck adapters as an adapter: where (`style`), how wide (`size`) and
  which nonlinearity (`activation`, a name `ftjax.models.layers.activation` knows)."""

  name: ClassVar[str] = "bottleneck"

  style: str = "houlsby"
  size: int = 64
  activation: str = "relu"

  def __post_init__(self):
    # Checked here, not in `inject`, so a bad value fails where the spec is written.
    if self.style not in STYLES:
      raise ConfigError(f"bottleneck style {self.style!r}; expected one of "
                        f"{', '.join(map(repr, STYLES))}")
    if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
      raise ConfigError(f"bottleneck size {self.size!r}; expected an integer >= 1")
    try:
      layers.activation(self.activation)
    except ValueError as e:
      raise ConfigError(f"bottleneck {e}") from None

  @property
  def targets(self) -> tuple[str, ...]:
    return STYLES[self.style]

  def inject(self, module: nnx.Module, *, rngs: nnx.Rngs) -> None:
    """Makes every adapted projection in `module` a `BottleneckMixin` layer, in place."""
    for path, name, dense in adapter_lib.dense_targets(module, self.targets,
                                                       f"bottleneck ({self.style})"):
      if isinstance(dense, BottleneckMixin):
        raise ConfigError(f"{name} already has a bottleneck adapter")
      layer = adapter_lib.extend(dense, BottleneckMixin)
      layer.add_bottleneck(size=self.size, activation=self.activation, rngs=rngs)
      adapter_lib.replace_module(module, path, layer)

  def rules(self) -> list[tuple[str, str]]:
    return [(r".*/adapter_(down|up)(_bias)?", TRAINABLE)]

  def merge(self, params: keymap.FlatParams) -> keymap.FlatParams:
    raise ConfigError(f"bottleneck adapters cannot be merged into the base weights (their "
                      f"{self.activation} nonlinearity is not linear); keep the ftjax checkpoint "
                      f"and evaluate or serve it with ftjax instead")

  def to_peft(self, model, params: keymap.FlatParams):
    raise CheckpointError("PEFT has no bottleneck adapters, so a bottleneck run has no PEFT "
                          "format; keep the ftjax checkpoint and evaluate or serve it with ftjax")


class BottleneckMixin:
  """A dense layer followed by a residual bottleneck MLP: `y + up(act(down(y)))`, `y = W x + b`.

  Extends whatever dense layer it adapts (`adapter.extend`), keeping its
  variables at the same paths, plus `adapter_down` (out..., size),
  `adapter_down_bias` (size,), `adapter_up` (size, out...) and
  `adapter_up_bias` (out...), with the kernel's output axes and `adapter`.
  """

  def add_bottleneck(self, *, size: int, activation: str, rngs: nnx.Rngs) -> None:
    out_axes = self.axes[len(self.in_features):]
    self.adapter_activation = activation
    self.adapter_down = nnx.Param(
        DOWN_INIT_STD * jax.random.normal(rngs.params(), (*self.out_features, size),
                                          self.param_dtype),
        logical_axes=(*out_axes, ADAPTER_AXIS))
    self.adapter_down_bias = nnx.Param(jnp.zeros((size,), self.param_dtype),
                                       logical_axes=(ADAPTER_AXIS,))
    self.adapter_up = nnx.Param(jnp.zeros((size, *self.out_features), self.param_dtype),
                                logical_axes=(ADAPTER_AXIS, *out_axes))
    self.adapter_up_bias = nnx.Param(jnp.zeros(self.out_features, self.param_dtype),
                                     logical_axes=out_axes)

  def __call__(self, inputs: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    y = super().__call__(inputs, deterministic=deterministic, rngs=rngs)
    down, down_bias, up, up_bias = self.promote_dtype(
        (self.adapter_down[...], self.adapter_down_bias[...], self.adapter_up[...],
         self.adapter_up_bias[...]), dtype=self.dtype)
    n_out = len(self.out_features)
    # y's trailing (out...) axes against down's leading ones.
    dims = ((tuple(range(y.ndim - n_out, y.ndim)), tuple(range(n_out))), ((), ()))
    h = jax.lax.dot_general(y.astype(down.dtype), down, dims, precision=self.precision)
    h = layers.activation(self.adapter_activation)(h + down_bias)
    delta = jnp.tensordot(h, up, axes=1, precision=self.precision) + up_bias
    return y + delta.astype(y.dtype)


def bottleneck_paths(params) -> list[str]:
  """Flat paths ("a/b/0/adapter_down") of the bottleneck leaves in `params`."""
  return [p for p in keymap.flatten(params) if p.rsplit("/", 1)[-1] in LEAVES]


def _from_strategy(strategy: ml_collections.ConfigDict) -> BottleneckSpec:
  s = strategy.bottleneck
  return BottleneckSpec(style=s.style, size=s.size, activation=s.activation)


def _config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # "houlsby": after the attention output and the MLP down-projection of every
  # layer; "pfeiffer": after the MLP down-projection only.
  c.style = "houlsby"
  # The bottleneck width (hidden -> size -> hidden).
  c.size = 64
  # The nonlinearity between the projections (a Hugging Face activation name).
  c.activation = "relu"
  return c


adapter_lib.register("bottleneck", _from_strategy, config=_config, strategy=True)
