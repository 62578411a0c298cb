"""The train state: what a step updates, kept apart from what it only reads.

`trainable` holds the model's trainable parameters (nested dicts keyed like
every parameter path, e.g. `encoder/layers/3/attention/query/kernel`) and,
under the reserved key `objective`, trainable parameters that belong to the
objective rather than the model (a distillation projection): optimised and
checkpointed with the model's, never exported. `frozen` holds the model's
frozen parameters: never differentiated, no optimizer state, not
checkpointed (they are the base model's). Frozen reference models (a
teacher, a DPO reference) are not in the state at all: the step takes them
as a separate argument (`ftjax.core.step`).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ftjax import sharding

# Top-level key of `TrainState.trainable` for the objective's own parameters.
OBJECTIVE = "objective"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: Any


def split_objective(trainable: dict) -> tuple[dict, dict]:
  """(the model's trainable params, the objective's params) of `TrainState.trainable`."""
  model = {k: v for k, v in trainable.items() if k != OBJECTIVE}
  return model, trainable.get(OBJECTIVE, {})


def opt_state_shardings(optimizer: optax.GradientTransformation, trainable,
                        mesh: jax.sharding.Mesh):
  """Moments take their parameter's sharding; counters are replicated.

  `trainable` may hold arrays or `jax.ShapeDtypeStruct`s with shardings.
  """
  return optax.tree_map_params(
      optimizer, lambda _, param: param.sharding, jax.eval_shape(optimizer.init, trainable),
      trainable, transform_non_params=lambda _: sharding.replicated(mesh))


def init_state(trainable, frozen, optimizer: optax.GradientTransformation,
               mesh: jax.sharding.Mesh) -> TrainState:
  """Step 0: the optimizer state created straight into its shardings."""
  opt_state = jax.jit(optimizer.init,
                      out_shardings=opt_state_shardings(optimizer, trainable, mesh))(trainable)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  return TrainState(step=step, trainable=trainable, frozen=frozen, opt_state=opt_state)


def checkpointed(state: TrainState) -> dict:
  """What a checkpoint holds of the state (frozen params are the base model's)."""
  return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}
