"""Compatibility names for code written before `ftjax.core` and `ftjax.objectives`.

The training core lives in `ftjax.core` (state, step, run, loop, hooks) and
the task-specific parts in `ftjax.objectives`; this module only re-exports
the names callers used (`train.setup`, `train.compile_steps`,
`train.train_and_evaluate`, ...). New code imports from `ftjax.core`.
"""

from ftjax.core.compiled import compile_steps, evaluate
from ftjax.core.hooks import Preempted
from ftjax.core.loop import train_and_evaluate
from ftjax.core.run import Run, execution, load_model, partition_summary, setup
from ftjax.core.state import TrainState, opt_state_shardings
from ftjax.core.step import make_eval_step, make_train_step
from ftjax.core.transfer import init_from

__all__ = ["Preempted", "Run", "TrainState", "compile_steps", "evaluate", "execution",
           "init_from", "load_model", "make_eval_step", "make_train_step", "opt_state_shardings",
           "partition_summary", "setup", "train_and_evaluate"]
