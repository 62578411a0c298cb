"""Multi-process training through `python -m ftjax.main`: 2 processes x 2 CPU devices.

The same tiny run three ways, all on a 4-device data-parallel mesh:
  A: one process with 4 devices, steps 1-6 (the reference);
  B: `python -m ftjax.main` as two processes with 2 devices each (gloo
     collectives, coordinator on 127.0.0.1), steps 1-3, then stopping with
     a checkpoint;
  C: B's workdir resumed by one process with 4 devices, steps 4-6.
A and C run in this process (`train_and_evaluate`, the function the entry
point calls; A while B's processes run). B+C must give A's losses and
evaluations: the processes fed disjoint rows of each batch, and the
checkpoint they wrote together restores exactly in one process.
"""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax import distributed, logs, models, sharding, train
from ftjax.data import pipeline, sources
from ftjax.errors import ConfigError
from tests import tiny_bert
from tests.conftest import REPO

STEPS, STOP_AT = 6, 3
RUN = {
    "model.name_or_path": None, "data.path": None,  # set per test
    "data.max_length": 32, "data.num_buckets": 1, "training.batch_size": 16,
    "training.num_steps": STEPS, "training.log_every_steps": 1, "eval.every_steps": 3,
    "eval.splits": ("validation",), "eval.batch_size": 32, "checkpoint.every_steps": 3,
    "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 2, "mesh.data": 4,
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  """A random 2-layer BERT (no dropout) with MiniLM's tokenizer; 256/64 examples."""
  root = tmp_path_factory.mktemp("multihost")
  return (tiny_bert.make_model(root / "model", minilm_dir),
          tiny_bert.make_data(root / "data", data_dir))


def _overrides(tiny_dirs) -> dict:
  model_dir, data_path = tiny_dirs
  return {**RUN, "model.name_or_path": str(model_dir), "data.path": str(data_path)}


def _config(tiny_dirs):
  """The config the subprocesses run: configs/sentiment_minilm.py plus `_overrides`."""
  spec = importlib.util.spec_from_file_location("sentiment_minilm",
                                                REPO / "configs" / "sentiment_minilm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.validate(config_lib.override(module.get_config(), _overrides(tiny_dirs)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tiny_dirs, workdir: pathlib.Path, *, num_devices: int, log: pathlib.Path,
            extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, pathlib.Path]:
  """Starts `python -m ftjax.main` with `num_devices` CPU devices; output goes to `log`."""
  flags = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
           for k, v in _overrides(tiny_dirs).items()]
  command = [sys.executable, "-m", "ftjax.main", "--config=configs/sentiment_minilm.py",
             f"--workdir={workdir}", *flags, *extra]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
         "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  with open(log, "w", encoding="utf-8") as out:
    process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
  return process, log


def _wait(launched: list[tuple[subprocess.Popen, pathlib.Path]], timeout: float = 240) -> None:
  """Waits for all; on the first failure (or the timeout) kills the rest and shows its output.

  A process whose peer died would otherwise wait for it until JAX's
  heartbeat timeout.
  """
  deadline = time.monotonic() + timeout
  while True:
    codes = [p.poll() for p, _ in launched]
    failed = [(p, log) for (p, log), code in zip(launched, codes) if code not in (None, 0)]
    if failed or None not in codes or time.monotonic() > deadline:
      break
    time.sleep(0.2)
  _kill(launched)
  if failed or None in codes:
    p, log = failed[0] if failed else launched[codes.index(None)]
    tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
    pytest.fail(f"{' '.join(p.args[:4])} ... exited with {p.returncode} "
                f"({'timed out' if not failed else 'failed'}); its output ends:\n{tail}")


def _check_two_process_part(tmp_path):
  b_log = (tmp_path / "b0.log").read_text()
  assert "JAX process 0 of 2 (flags)" in b_log and "global devices: 4" in b_log
  assert "Stopping at step 3 as asked" in b_log
  # Process 1 logs warnings only and writes nothing: one metrics row per step.
  assert "step 1: train/" not in (tmp_path / "b1.log").read_text()
  steps = [r["step"] for r in logs.read_metrics(tmp_path / "b") if "train/loss" in r]
  assert steps == [1, 2, 3]


def _kill(launched: list[tuple[subprocess.Popen, pathlib.Path]]) -> None:
  for p, _ in launched:
    if p.poll() is None:
      p.kill()
      p.wait()


def _rows(workdir, key):
  return {r["step"]: r[key] for r in logs.read_metrics(workdir) if key in r}


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tiny_dirs, tmp_path):
  port = _free_port()
  pair = [_launch(tiny_dirs, tmp_path / "b", num_devices=2, log=tmp_path / f"b{i}.log",
                  extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                         f"--process_id={i}", "--cpu_collectives=gloo",
                         f"--stop_at_step={STOP_AT}"))
          for i in range(2)]
  try:
    # A, meanwhile: one process (4 of this test's 8 devices), the function main calls.
    train.train_and_evaluate(_config(tiny_dirs), str(tmp_path / "a"), devices=jax.devices()[:4])
    _wait(pair)
  finally:
    _kill(pair)
  _check_two_process_part(tmp_path)
  # C: one process continues the checkpoint the two processes wrote together.
  train.train_and_evaluate(_config(tiny_dirs), str(tmp_path / "b"), devices=jax.devices()[:4])
  # Resumed, not restarted: steps 4-6 follow B's rows 1-3 once each.
  assert [r["step"] for r in logs.read_metrics(tmp_path / "b") if "train/loss" in r] == list(
      range(1, STEPS + 1))
  a_loss, bc_loss = _rows(tmp_path / "a", "train/loss"), _rows(tmp_path / "b", "train/loss")
  assert sorted(a_loss) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([bc_loss[s] for s in a_loss], list(a_loss.values()), atol=1e-5)
  # Learning rates (the restored step drives the schedule) and evaluations agree too.
  assert _rows(tmp_path / "b", "train/learning_rate") == pytest.approx(
      _rows(tmp_path / "a", "train/learning_rate"))
  a_eval, bc_eval = _rows(tmp_path / "a", "validation/loss"), _rows(tmp_path / "b",
                                                                   "validation/loss")
  assert sorted(a_eval) == sorted(bc_eval) == [3, 6]
  np.testing.assert_allclose([bc_eval[s] for s in a_eval], list(a_eval.values()), atol=1e-5)
  saved = json.loads((tmp_path / "b" / "results.json").read_text())
  assert saved["step"] == STEPS


def test_each_process_reads_its_own_rows_of_every_batch(tiny_dirs):
  """The rows of process 0 and 1 (of 2) are disjoint and together the one-process batch."""
  config = _config(tiny_dirs)
  tokenizer = models.load_tokenizer(config.model.name_or_path)
  split = pipeline.tokenize_split(sources.load_split(config.data, "train"), config.data,
                                  tokenizer, num_labels=2)

  def batches(process_index, process_count):
    iterator = pipeline.train_iterator(split, global_batch_size=16, buckets=(32,), seed=0,
                                       num_epochs=1, process_index=process_index,
                                       process_count=process_count)
    return [next(iterator) for _ in range(3)]

  whole, first, second = batches(0, 1), batches(0, 2), batches(1, 2)
  for w, f, s in zip(whole, first, second):
    assert len(f["index"]) == len(s["index"]) == 8
    assert not set(f["index"]) & set(s["index"])
    np.testing.assert_array_equal(np.concatenate([f["input_ids"], s["input_ids"]]),
                                  w["input_ids"])


@pytest.mark.parametrize("mesh, devices, ok", [
    ({"mesh.data": 8}, "in order", True),
    ({"mesh.data": 2, "mesh.tensor": 4}, "in order", True),
    ({"mesh.data": 4, "mesh.fsdp": 2}, "in order", True),
    ({"mesh.data": 1, "mesh.tensor": 8}, "in order", False),  # batch replicated over processes
    ({"mesh.data": 8}, "interleaved", False),  # process 0 would need rows 0, 2, 4, ...
], ids=str)
def test_batch_sharding_must_give_each_process_its_own_rows(mesh, devices, ok):
  """Pretends devices 0-3 are process 0 and 4-7 process 1 (2 processes x 4 devices)."""
  config = config_lib.override(config_lib.default_config(), mesh)
  ordered = jax.devices()
  if devices == "interleaved":
    ordered = [d for pair in zip(ordered[:4], ordered[4:]) for d in pair]
  batch_sharding = sharding.batch_sharding(config, sharding.make_mesh(config, ordered))

  def check():
    sharding.check_process_rows(batch_sharding, 16, process_of=lambda d: d.id // 4)

  if ok:
    check()
  else:
    with pytest.raises(ConfigError, match=r"gives process 0 (16 rows \(0\.\.15\)|8 rows "
                       r"\(0\.\.13\)) of each 16-row batch, but it reads rows 0\.\.7; split"):
      check()


CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
                "JAX_COORDINATOR_ADDRESS")


@pytest.fixture
def no_cluster(monkeypatch):
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
     r"--process_id=2 with --num_processes=2; expected 0 <= process_id < 2"),
    ({"coordinator_address": "127.0.0.1", "num_processes": 2, "process_id": 0},
     r"--coordinator_address='127.0.0.1'; expected host:port"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 0, "process_id": 0},
     r"--num_processes=0; expected >= 1"),
    ({"num_processes": 2, "process_id": 1},
     r"needs --coordinator_address as well \(no SLURM, Cloud TPU or Open MPI"),
    ({"coordinator_address": "127.0.0.1:1234"}, r"needs --num_processes, --process_id as well"),
    ({"local_device_ids": [0, 1]}, r"--local_device_ids is set but this is a single-process"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
      "local_device_ids": [1, 1]}, r"--local_device_ids=1,1; expected distinct"),
    ({"cpu_collectives": "nccl"}, r"--cpu_collectives='nccl'; expected one of \('gloo', 'mpi'\)"),
])
def test_inconsistent_flags_fail_in_one_line_before_connecting(no_cluster, kwargs, message):
  with pytest.raises(ConfigError, match=message):
    distributed.initialize(**kwargs)
  assert not jax.distributed.is_initialized()


def test_a_plain_run_initialises_nothing_and_clusters_are_detected(no_cluster):
  assert distributed.initialize() == distributed.Setup("single process")
  assert not jax.distributed.is_initialized()
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0"}
  assert distributed.detect_cluster({**slurm, "SLURM_NTASKS": "2"}) == "SLURM"
  assert distributed.detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: no peers
  assert distributed.detect_cluster({"SLURM_JOB_ID": "7"}) is None  # an salloc shell
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == "Cloud TPU"
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert distributed.detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}
                                    ) == "Open MPI"
  assert distributed.detect_cluster({}) is None
