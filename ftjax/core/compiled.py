"""The run's steps, jitted once with explicit shardings, and evaluation of a split."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from ftjax import sharding
from ftjax.core import step as step_lib
from ftjax.core.run import Run
from ftjax.core.state import TrainState


@dataclasses.dataclass(frozen=True)
class BoundStep:
  """A jitted step with the run's reference models bound: `step(*args)` = `jitted(...refs...)`.

  `jitted` is the `jax.jit` object itself (for `.lower(...)`, cost and
  memory analysis); references sit at `refs_index` of its arguments.
  """

  jitted: Callable
  refs: dict
  refs_index: int

  def _with_refs(self, args):
    return (*args[:self.refs_index], self.refs, *args[self.refs_index:])

  def __call__(self, *args):
    return self.jitted(*self._with_refs(args))

  def lower(self, *args) -> "BoundLowered":
    """`jitted.lower` with the references bound; `.compile()` gives a bound compiled step."""
    return BoundLowered(self.jitted.lower(*self._with_refs(args)), self.refs, self.refs_index)

  def __getattr__(self, name):  # memory_analysis, cost_analysis, ... of the compiled step
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.jitted, name)


@dataclasses.dataclass(frozen=True)
class BoundLowered:
  """A lowered step (`.as_text()`, `.cost_analysis()`, ...) whose `compile()` stays bound."""

  lowered: Any
  refs: dict
  refs_index: int

  def compile(self) -> BoundStep:
    return BoundStep(self.lowered.compile(), self.refs, self.refs_index)

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.lowered, name)


def compile_steps(run: Run, grad_fn: step_lib.GradFn = step_lib.batch_grads
                  ) -> tuple[BoundStep, BoundStep]:
  """`train_step(state, batch, rng)` and `eval_step(trainable, frozen, batch)`, jitted.

  The state is donated to the train step; reference models are not (they are
  read by every step). Both are bound to `run.refs`.
  """
  state_sharding = jax.tree.map(lambda x: x.sharding, run.initial_state)
  refs_sharding = jax.tree.map(lambda x: x.sharding, run.refs)
  batch_sharding = sharding.batch_sharding(run.config, run.mesh)
  replicated = sharding.replicated(run.mesh)
  train_step = jax.jit(
      step_lib.make_train_step(run.objective, run.model, run.optimizer, run.learning_rate,
                               accumulation_steps=run.config.optimizer.accumulation_steps,
                               grad_fn=grad_fn),
      in_shardings=(state_sharding, refs_sharding, batch_sharding, replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(run.objective, run.model),
                      in_shardings=(state_sharding.trainable, state_sharding.frozen,
                                    refs_sharding, batch_sharding), out_shardings=replicated)
  return BoundStep(train_step, run.refs, 1), BoundStep(eval_step, run.refs, 2)


def evaluate(run: Run, state: TrainState, eval_step, split_name: str) -> dict[str, float]:
  """The objective's metrics on a whole split: every example once (padding rows weigh 0).

  Batches are dispatched back to back; results come to the host once, at
  the end (replicated outputs, so this is multi-host safe).
  """
  outputs = [eval_step(state.trainable, state.frozen, run.device_batch(split_name, batch))
             for batch in run.data.eval_batches(split_name)]
  return run.objective.eval_metrics(jax.device_get(outputs))
