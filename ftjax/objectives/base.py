"""What an objective is: the one place a training method names its task.

The core (`ftjax.core`) trains any `Objective`. An objective owns:

  * its config group `config.objective.*` (`Objective.config()`), checked by
    `check_config` before anything loads;
  * the model head it needs (`head`: the `model.task` the backbone is built
    with) and the reference models it needs (`references`: frozen models
    the step gets beside the state; none yet for the built-in objectives);
  * how its data become batches (`build_data` -> `Data`: the splits, the
    padded lengths, steps per epoch, train iterator and eval batches; the
    batch's arrays are declared once in `batch_spec`);
  * its loss with summable metric sums (`loss`), which micro-batches and eval
    batches add up; per-step metrics from those sums (`step_metrics`) and
    extra log columns from a window of steps (`log_metrics`);
  * its eval outputs (`eval_outputs`, on device) and how they become metrics
    (`eval_metrics`, on the host), plus evaluations that are not a batch
    sum (`extra_eval`, e.g. generation);
  * trainable parameters of its own (`init_params`, e.g. a distillation
    projection): they live under `state.trainable["objective"]`, are
    optimised and checkpointed with the model's, and are never exported.

Write a new objective as a subclass in its own file and `register` it
(`ftjax.objectives.register`); `README.md` ("Adding an objective") has a
worked example, and `tests/test_objective_extension.py` one that lives in a
test file.
"""

import abc
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Batch = Mapping[str, jax.Array]
HostBatch = Mapping[str, np.ndarray]
# Host batch keys that say where rows come from; the step never reads them.
BOOKKEEPING = ("index", "example_ids")


@dataclasses.dataclass(frozen=True)
class Reference:
  """A frozen reference model: its graph, its parameters (the step's `refs[name]`) and
  what identifies it (recorded in every checkpoint; resuming with another is refused)."""

  model: Any
  params: Any
  identity: dict


@dataclasses.dataclass
class Data:
  """An objective's data for one run: what the core iterates over."""

  train_split: Any
  eval_splits: dict[str, Any]
  # Padded sequence lengths XLA compiles for.
  buckets: tuple[int, ...]
  steps_per_epoch: int
  pad_id: int
  # (num_steps) -> an iterator of global host batches with get_state/set_state
  # (its position is checkpointed).
  train_iterator: Callable[[int], Iterator[HostBatch]]
  # (split name) -> the split's eval batches, every example once (padding rows weigh 0).
  eval_batches: Callable[[str], Iterable[HostBatch]]
  # Objective-specific extras (a mixture's batch plan, task names, ...).
  extras: dict[str, Any] = dataclasses.field(default_factory=dict)


class Objective(abc.ABC):
  """A training objective (see the module docstring for the contract)."""

  name: ClassVar[str]
  # The `model.task` the backbone is built with (which head it carries).
  head: ClassVar[str]
  # Metric names `eval.metric` may name ("<split>/<metric>").
  metrics: ClassVar[tuple[str, ...]]
  # Names of the frozen reference models the step needs (teacher, reference policy).
  references: ClassVar[tuple[str, ...]] = ()

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @classmethod
  def head_for(cls, config: ml_collections.ConfigDict) -> str:
    """The head this objective trains under `config` (a wrapper's depends on what it wraps)."""
    del config
    return cls.head

  @classmethod
  def metrics_for(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The metrics `eval.metric` may name under `config`."""
    del config
    return cls.metrics

  @staticmethod
  @abc.abstractmethod
  def batch_spec(batch_size: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The typed batch: every array the step reads, by name, for a (batch, length) batch."""

  @classmethod
  def config(cls) -> ml_collections.ConfigDict:
    """The objective's own keys under `config.objective` (besides `name`)."""
    return ml_collections.ConfigDict()

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` for values this objective cannot use."""

  # Data.

  @abc.abstractmethod
  def build_data(self, model, tokenizer) -> Data:
    """Tokenises the splits and fixes the padded lengths (see `Data`)."""

  def load_references(self, model, tokenizer, shardings) -> dict[str, "Reference"]:
    """The frozen reference models `references` names, loaded (a teacher, a DPO reference).

    `shardings(model)` gives a model's parameter shardings by the run's rules;
    `model` and `tokenizer` are the trained model's (to check the two agree).
    """
    del model, tokenizer, shardings
    if self.references:
      raise NotImplementedError(f"objective {self.name!r} names references {self.references} "
                                f"but does not load them")
    return {}

  def prepare(self, run) -> None:
    """Called once the run's state exists (e.g. to compute cached features)."""

  def host_batch(self, split_name: str, batch: HostBatch) -> HostBatch:
    """The arrays of a host batch the step reads (drops bookkeeping keys such as `index`)."""
    del split_name
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING}

  # Parameters.

  def init_params(self, model, rng: jax.Array) -> dict:
    """Trainable parameters of the objective itself (none by default)."""
    del model, rng
    return {}

  # What a wrapping objective (distillation) builds on; the built-in objectives have them.

  def forward(self, model, params, batch: Batch, *, rng, deterministic: bool):
    """The model's `ModelOutput` on a batch (logits and hidden states)."""
    raise NotImplementedError(f"objective {self.name!r} cannot be wrapped (no forward)")

  def hard_loss(self, logits, batch: Batch, normalizer) -> tuple[jax.Array, dict]:
    """(loss, summable sums) of the objective on logits `forward` returned."""
    raise NotImplementedError(f"objective {self.name!r} cannot be wrapped (no hard_loss)")

  def logit_weights(self, batch: Batch) -> jax.Array:
    """Weights of the logits' leading dims (rows, or tokens) in the loss; they sum to
    `normalizer(batch)`."""
    raise NotImplementedError(f"objective {self.name!r} cannot be wrapped (no logit_weights)")

  def token_weights(self, batch: Batch) -> jax.Array:
    """(batch, length) weights of hidden states in a per-token loss, summing to
    `normalizer(batch)` (each row's real tokens share its weight, or the loss mask)."""
    raise NotImplementedError(f"objective {self.name!r} cannot be wrapped (no token_weights)")

  # Loss and metrics (traced inside the jitted steps).

  @abc.abstractmethod
  def loss(self, model, params, objective_params, refs, batch: Batch, *, rng, deterministic: bool,
           normalizer) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss sum / normalizer, summable sums) of a batch.

    `params` are the model's (trainable and frozen merged); `refs` the
    reference models' params by name.
    """

  def normalizer(self, batch: Batch) -> jax.Array:
    """What the loss is averaged over in a step: the batch's total weight."""
    return batch["weights"].sum()

  def step_metrics(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-step metrics from the step's sums (the core adds loss, lr and norms)."""
    if "correct" not in sums:
      return {}
    return {"accuracy": sums["correct"] / jnp.maximum(sums["weight"], 1.0)}

  def log_metrics(self, window: list[Mapping[str, Any]]) -> dict[str, float]:
    """Extra `train/...` columns of a log row, from the steps' host metrics."""
    del window
    return {}

  @abc.abstractmethod
  def eval_outputs(self, model, params, objective_params, refs,
                   batch: Batch) -> dict[str, jax.Array]:
    """What an eval batch returns to the host (sums, or predictions and labels)."""

  @abc.abstractmethod
  def eval_metrics(self, outputs: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """A split's metrics from the host copies of every eval batch's outputs."""

  def extra_eval(self, run, state, split_name: str, step: int) -> dict[str, float]:
    """Evaluations that are not batch sums (generation); none by default."""
    del run, state, split_name, step
    return {}
