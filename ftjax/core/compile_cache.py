"""Compile once per machine: JAX's persistent compilation cache, on by default.

A run, the evaluator, the ablation and the benchmarks call `enable()` before
they compile anything, so a second run of the same config (same programs,
same devices, same JAX) loads its executables from disk instead of
recompiling them. Where the cache lives, in order of precedence:

  1. `--compilation_cache=DIR` of the entry point (`none` disables it);
  2. `$FTJAX_COMPILATION_CACHE` (`none` disables it);
  3. `$JAX_COMPILATION_CACHE_DIR` or `jax.config` when already set (e.g. by a
     test session or a cluster's launcher): left as it is;
  4. `<user cache dir>/ftjax/xla` (`$XDG_CACHE_HOME` or `~/.cache`).

XLA keys every entry on the program, the compile options, the devices and the
JAX/XLA versions, so a stale hit cannot happen. `CompileStats` counts what a
run compiled and what it loaded from the cache (`results.json`).
"""

import os
import pathlib
import threading

import jax
from absl import logging

DISABLED = ("none", "off", "")
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HITS = "/jax/compilation_cache/cache_hits"
_CACHE_MISSES = "/jax/compilation_cache/cache_misses"


def default_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "ftjax" / "xla"


def enable(directory: str | None = None) -> pathlib.Path | None:
  """Turns the persistent cache on (see the module docstring); returns its folder or None."""
  if directory is None:
    directory = os.environ.get("FTJAX_COMPILATION_CACHE")
  if directory is None and jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  if directory is not None and directory.strip().lower() in DISABLED:
    jax.config.update("jax_enable_compilation_cache", False)
    logging.info("persistent compilation cache: disabled")
    return None
  path = pathlib.Path(directory).expanduser() if directory else default_dir()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    logging.warning("persistent compilation cache: cannot create %s (%s); compiling without "
                    "it", path, e.strerror)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  logging.info("persistent compilation cache: %s", path)
  return path


class CompileStats:
  """Seconds of XLA backend compilation, cache hits and misses while it is active.

  Counts every program compiled in this process meanwhile (JAX's monitoring
  events are process-wide), which in a run is the run's own steps.
  """

  def __init__(self):
    self.backend_seconds, self.cache_hits, self.cache_misses = 0.0, 0, 0
    self._lock = threading.Lock()

  def _duration(self, event: str, seconds: float, **_) -> None:
    if event == _BACKEND_COMPILE:
      with self._lock:
        self.backend_seconds += seconds

  def _event(self, event: str, **_) -> None:
    with self._lock:
      if event == _CACHE_HITS:
        self.cache_hits += 1
      elif event == _CACHE_MISSES:
        self.cache_misses += 1

  def __enter__(self) -> "CompileStats":
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    jax.monitoring.register_event_listener(self._event)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._duration)
    jax.monitoring.unregister_event_listener(self._event)

  def summary(self) -> dict:
    return {"compile/backend_seconds": self.backend_seconds,
            "compile/cache_hits": self.cache_hits, "compile/cache_misses": self.cache_misses}
