"""Compile once per machine: the persistent compilation cache is on by default and a second
process loads what the first compiled."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from ftjax.core import compile_cache
where = compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)
with compile_cache.CompileStats() as stats:
  jax.jit(lambda x: jnp.tanh(x) @ x.T + 1)(jnp.ones((32, 32))).block_until_ready()
print(json.dumps({"where": str(where) if where else None,
                  "enabled": bool(jax.config.jax_enable_compilation_cache), **stats.summary()}))
"""


def _run(tmp_path, *args, **env):
  base = {k: v for k, v in os.environ.items()
          if k not in ("JAX_COMPILATION_CACHE_DIR", "FTJAX_COMPILATION_CACHE")}
  result = subprocess.run(
      [sys.executable, "-c", PROGRAM, *args], cwd=REPO, capture_output=True, text=True,
      timeout=120, env={**base, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "XLA_FLAGS": "",
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env})
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_cache_is_under_the_user_cache_dir_and_a_second_process_loads(tmp_path):
  first = _run(tmp_path)
  assert first["where"] == str(tmp_path / "xdg" / "ftjax" / "xla") and first["enabled"]
  assert first["compile/cache_misses"] >= 1 and first["compile/cache_hits"] == 0
  second = _run(tmp_path)
  assert second["compile/cache_hits"] >= 1 and second["compile/cache_misses"] == 0


def test_the_flag_and_the_environment_move_or_disable_it(tmp_path):
  moved = _run(tmp_path, str(tmp_path / "elsewhere"))
  assert moved["where"] == str(tmp_path / "elsewhere") and any((tmp_path / "elsewhere").iterdir())
  from_env = _run(tmp_path, FTJAX_COMPILATION_CACHE=str(tmp_path / "env"))
  assert from_env["where"] == str(tmp_path / "env")
  off = _run(tmp_path, "none")
  assert off["where"] is None and not off["enabled"]
  assert off["compile/cache_hits"] == 0
  # A cache dir JAX already has (a cluster's launcher, the test session) is left alone.
  kept = _run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))
  assert kept["where"] == str(tmp_path / "jax")

