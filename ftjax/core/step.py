"""The pure train and eval steps, built from an objective; compiled once per run.

  train_step(state, refs, batch, rng) -> (state, metrics)
  eval_step(trainable, frozen, refs, batch) -> outputs     (the objective's eval outputs)

`refs` are the frozen reference models an objective needs (a teacher, a DPO
reference): an argument of their own, never donated, never differentiated,
with their own shardings; `{}` when the objective needs none. Only
`state.trainable` is differentiated, so JAX does no backward work for a
frozen prefix and forms no gradients for frozen weights.

The gradient function is a parameter: `grad_fn(loss_fn, trainable, batch, rng,
normalizer) -> ((loss, sums), grads)`, where `loss_fn(trainable, batch, rng,
normalizer) -> (loss, sums)`. The default (`batch_grads`) differentiates the
batch loss; DP-SGD plugs in per-example clipped gradients. Gradient
accumulation wraps whichever is used.
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from ftjax.core.state import TrainState, split_objective
from ftjax.peft import partition

GradFn = Callable[..., tuple[tuple[jax.Array, dict], dict]]


def batch_grads(loss_fn, trainable, batch, rng, normalizer):
  """Gradients of the batch loss (the default `grad_fn`)."""
  return jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch, rng, normalizer)


def accumulate(grad_fn: GradFn, steps: int) -> GradFn:
  """`grad_fn` over `steps` micro-batches of the batch, summed in a scan (one step).

  The loss is normalised by the whole batch's weight, so the summed gradient
  is the whole batch's; each micro-batch folds its own dropout key from the
  step's (`fold_in(rng, index)`), so with dropout on, accumulation draws
  other masks than one big batch would (same distribution, other bits).
  """
  if steps == 1:
    return grad_fn

  def accumulated(loss_fn, trainable, batch, rng, normalizer):
    # (B, ...) -> (accum, B / accum, ...) keeping each device's rows together.
    def to_micro(x):
      return x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)

    micro_batches = jax.tree.map(to_micro, batch)

    def body(carry, inputs):
      micro_batch, index = inputs
      (loss, sums), grads = grad_fn(loss_fn, trainable, micro_batch,
                                    jax.random.fold_in(rng, index), normalizer)
      return jax.tree.map(jnp.add, carry, (grads, loss, sums)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    _, sums_shape = jax.eval_shape(loss_fn, trainable, first, rng, normalizer)
    init = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros(()),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, loss, sums), _ = jax.lax.scan(body, init, (micro_batches, jnp.arange(steps)))
    return (loss, sums), grads

  return accumulated


def model_params(trainable, frozen):
  """The model's parameters (trainable and frozen merged) and the objective's own."""
  model_trainable, objective_params = split_objective(trainable)
  return partition.merge(model_trainable, frozen), objective_params


def make_train_step(objective, model, optimizer: optax.GradientTransformation,
                    learning_rate: optax.Schedule, *, accumulation_steps: int = 1,
                    grad_fn: GradFn = batch_grads) -> Callable:
  """The pure `train_step(state, refs, batch, rng) -> (state, metrics)`."""
  grads_of = accumulate(grad_fn, accumulation_steps)

  def train_step(state: TrainState, refs: Mapping, batch: Mapping, rng: jax.Array):
    def loss_fn(trainable, batch, rng, normalizer):
      params, objective_params = model_params(trainable, state.frozen)
      return objective.loss(model, params, objective_params, refs, batch, rng=rng,
                            deterministic=False, normalizer=normalizer)

    # The run's key is folded with the step, never advanced: the seed alone
    # reproduces every step's dropout on resume.
    step_rng = jax.random.fold_in(rng, state.step)
    (loss, sums), grads = grads_of(loss_fn, state.trainable, batch, step_rng,
                                   objective.normalizer(batch))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    # No in-step NaN guard (a select over every parameter and moment costs a
    # full pass over the state each step): the loop checks every step's loss
    # before anything is evaluated or saved.
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, {"loss": loss, **objective.step_metrics(sums),
                       "learning_rate": learning_rate(state.step),
                       "grad_norm": optax.global_norm(grads),
                       "update_norm": optax.global_norm(updates)}

  return train_step


def make_eval_step(objective, model) -> Callable:
  """The pure `eval_step(trainable, frozen, refs, batch) -> outputs`."""

  def eval_step(trainable, frozen, refs, batch):
    params, objective_params = model_params(trainable, frozen)
    return objective.eval_outputs(model, params, objective_params, refs, batch)

  return eval_step
