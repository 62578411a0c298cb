"""ftjax entry point.

  python -m ftjax.main --config=configs/sentiment_minilm.py --workdir=/tmp/run \
      --config.model.name_or_path=/path/to/model

Multi-process (several hosts, or several processes on one host), the same
command on every process plus where process 0 listens:

  python -m ftjax.main ... --coordinator_address=10.0.0.1:1234 --num_processes=2 \
      --process_id=$RANK [--cpu_collectives=gloo]

On SLURM (several tasks), Cloud TPU slices and mpirun the three flags come
from the environment (`ftjax.distributed`); a plain one-process run
initialises nothing.

Errors in the user's input (bad config, missing files, a checkpoint that does
not fit) print one line and exit with status 1.
"""

import logging as pylogging
import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ftjax import config as config_lib
from ftjax import distributed, probe
from ftjax import workdir_lock as lock
from ftjax.core import compile_cache, hooks, loop
from ftjax.errors import FtjaxError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<exp>.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for logs, metrics and checkpoints.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "probe"],
    "train: fine-tune and evaluate (resuming from workdir's latest checkpoint); "
    "probe: load the model and run one forward pass on real text.")
_STOP_AT_STEP = flags.DEFINE_integer(
    "stop_at_step", None, "Stop (with a checkpoint) at this step; rerun the same command to "
    "continue. For queues with time limits.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run (with "
    "--num_processes and --process_id); on SLURM, Cloud TPU and mpirun read from the "
    "environment.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, num_processes).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Devices of this host this process uses (e.g. 0,1); default all.")
_CPU_COLLECTIVES = flags.DEFINE_enum(
    "cpu_collectives", None, list(distributed.CPU_COLLECTIVES),
    "Cross-process collectives on CPU (multi-process CPU runs need one); default: JAX's.")
COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Folder of JAX's persistent compilation cache ('none' disables "
    "it); default $FTJAX_COMPILATION_CACHE, else ~/.cache/ftjax/xla.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad `--config.<key>` override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"ftjax: error: {_one_line(str(e))}")
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a key the config lacks.
    missing = str(e).strip("\"'")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = next((o for o in overrides if missing in o.split(".")), None)
    if bad is None:  # Not an override: a bug in the config file, keep its traceback.
      raise
    hint = ("; an objective's own keys exist once the config file sets it with "
            "config_lib.set_objective(config, name) (configs/distill_minilm.py does)"
            if bad.startswith("--config.objective.") else "")
    sys.exit(f"ftjax: error: unknown config key {bad[len('--config.'):]!r} (from {bad}); "
             f"configs/forkme.py lists every key{hint}")


def _one_line(message: str) -> str:
  """config_flags puts the config file's traceback in its message: keep the flag and the error."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  return " ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else message.strip()


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of the checkpoint and data libraries (warnings still show).

  Their errors keep their line but not their traceback: orbax logs a failed
  background write (a full disk) once per thread, with a traceback each, and
  the run then stops with one `ftjax: error:` line saying what to do.
  """

  _NOISY = ("/orbax/", "/grain/", "/etils/", "/tensorstore/")

  def filter(self, record: pylogging.LogRecord) -> bool:
    if not any(n in record.pathname for n in self._NOISY):
      return True
    record.exc_info = record.exc_text = None
    return record.levelno > pylogging.INFO


def _loaded_config():
  """`--config`'s ConfigDict; a config file that does not exist is one line.

  config_flags defers a failed load to the first use of the config; a file
  that exists but fails to load is a bug in it and keeps its traceback.
  """
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  if not os.path.isfile(path):
    raise FtjaxError(f"--config={path}: no such file; expected an experiment config such as "
                     f"configs/sentiment_minilm.py (configs/forkme.py lists every key)")
  return _CONFIG.value


def _local_device_ids(values: list[str] | None) -> list[int] | None:
  if not values:
    return None
  try:
    return [int(v) for v in values]
  except ValueError:
    raise FtjaxError(f"--local_device_ids={','.join(values)}; expected comma-separated "
                     f"integers, e.g. 0,1") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    # Before anything touches a device: the backend is set up for the whole run.
    setup = distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        _local_device_ids(_LOCAL_DEVICE_IDS.value), cpu_collectives=_CPU_COLLECTIVES.value)
    if not _WORKDIR.value.strip():
      raise FtjaxError("--workdir is empty; expected a folder for the run's logs, metrics and "
                       "checkpoints, e.g. --workdir=runs/minilm")
    config = config_lib.validate(_loaded_config())
    compile_cache.enable(COMPILATION_CACHE.value)
    logging.info("JAX process %d of %d (%s), local devices: %s; global devices: %d",
                 jax.process_index(), jax.process_count(), setup.how, jax.local_devices(),
                 jax.device_count())
    if jax.process_index() > 0:
      # Process 0 speaks for the run (progress, metrics); the others only warn.
      logging.set_verbosity(logging.WARNING)
    if _MODE.value == "probe":
      with lock.hold(_WORKDIR.value):
        probe.run(config, _WORKDIR.value)
    else:
      loop.train_and_evaluate(config, _WORKDIR.value, stop_at_step=_STOP_AT_STEP.value)
  except hooks.Preempted as e:
    # 128 + the signal, as if it had ended the process: not "finished".
    print(f"ftjax: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:
    # Ctrl-C before training started, or a second one during it: no new checkpoint.
    print("ftjax: interrupted (Ctrl-C) without a new checkpoint; the last complete one is "
          "kept; run the same command to continue from it", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  except FtjaxError as e:
    sys.exit(f"ftjax: error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
