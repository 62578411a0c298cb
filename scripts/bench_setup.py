"""What the benchmark scripts share: a run's config, its first real batches, a child process.

`bench_strategies.py` and `benchmark.py` time the library's own train step
(`ftjax.core.run.setup` + `ftjax.core.compiled.compile_steps`, as `python -m ftjax.main`
runs it) on the first batches of epoch 0, each variant in a child process of
its own so that its peak RSS and compile time are its own.
"""

import json
import os
import subprocess
import sys

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def load_config(config_file: str, overrides: dict):
  """`configs/<config_file>` with `overrides` (dotted keys), validated; no evaluation splits."""
  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  from ftjax import config as config_lib
  # pylint: enable=g-import-not-at-top
  path = config_file if os.path.isabs(config_file) else os.path.join(CONFIGS, config_file)
  config = config_flags.config_flags._LoadConfigModule("c", path).get_config()  # pylint: disable=protected-access
  config.eval.splits = ()
  return config_lib.validate(config_lib.override(config, overrides))


def first_batches(run, num_steps: int) -> list[dict]:
  """The first `num_steps` training batches of epoch 0, on the run's mesh.

  The same examples in the same order for every strategy of a config (the
  plan depends on the seed, batch size and buckets only).
  """
  iterator = run.data.train_iterator(num_steps)  # the objective's batches, as the loop's
  return [run.device_batch(run.config.data.train_split, next(iterator))
          for _ in range(num_steps)]


RESULT_PREFIX = "RESULT "


def print_result(result) -> None:
  """What a child process hands back: one line of JSON on stdout."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(argv: list[str], *, what: str, env: dict | None = None):
  """Runs `python argv...` and returns the JSON it `print_result`ed; exits naming `what` on failure."""
  proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False,
                        env=env)
  line = next((l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)), None)
  if proc.returncode or line is None:
    sys.exit(f"{os.path.basename(argv[0])}: {what} failed (exit {proc.returncode}):\n"
             f"{proc.stderr[-3000:]}")
  return json.loads(line[len(RESULT_PREFIX):])
