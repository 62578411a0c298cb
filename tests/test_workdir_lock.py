"""One run per workdir (`ftjax.workdir_lock`), with real processes holding, dying and racing."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from ftjax import workdir_lock as lock
from ftjax.errors import FtjaxError, WorkdirLocked
from tests.conftest import REPO

HOST = socket.gethostname()

# Takes the lock, says so, and keeps it until killed.
HOLD = """
import sys, time
from ftjax import workdir_lock as lock
lock.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""

# Waits for the `go` file, races for the lock; a winner keeps it until the `done` file appears.
RACE = """
import os, sys, time
from ftjax import workdir_lock as lock
from ftjax.errors import WorkdirLocked
workdir, go, done = sys.argv[1:]
print("ready", flush=True)
while not os.path.exists(go):
  time.sleep(0.0002)
held = lock.WorkdirLock(workdir)
try:
  held.acquire()
except WorkdirLocked as e:
  print("lost", e, flush=True)
  sys.exit(0)
print("won", os.getpid(), flush=True)
while not os.path.exists(done):
  time.sleep(0.01)
held.release()
"""


def _python(script: str, *args, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def holder(tmp_path):
  """A process holding tmp_path/run's lock; killed at the end if the test has not."""
  process = _python(HOLD, tmp_path / "run")
  try:
    assert process.stdout.readline().strip() == "held", process.stderr.read()
    yield process
  finally:
    process.kill()
    process.wait()


def _stale_lock(workdir: pathlib.Path, *, host: str = HOST) -> dict:
  """The lock file a run killed with SIGKILL leaves behind: its (finished) pid, no flock."""
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  content = {"host": host, "pid": dead.pid, "started": "2024-01-01T00:00:00+00:00",
             "command": "python -m ftjax.main", "process_start": 1}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / ".lock").write_text(json.dumps(content))
  return content


def test_a_held_workdir_stops_a_second_run_in_one_line_naming_the_holder(holder, tmp_path):
  before = (tmp_path / "run" / ".lock").read_text()
  with pytest.raises(WorkdirLocked) as e:
    lock.WorkdirLock(tmp_path / "run").acquire()
  message = str(e.value)
  assert "\n" not in message
  started = json.loads(before)["started"]
  assert f"is in use by another run (host {HOST}, pid {holder.pid}, started {started})" in \
      message
  assert str(tmp_path / "run") in message
  # The holder's file is untouched.
  assert (tmp_path / "run" / ".lock").read_text() == before
  assert lock.read_holder(tmp_path / "run").pid == holder.pid


def test_a_killed_holder_is_taken_over_with_a_log_line(holder, tmp_path):
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert lock.read_holder(tmp_path / "run").pid == holder.pid  # SIGKILL left the file.
  result = subprocess.run(
      [sys.executable, "-c", "import sys; from ftjax import workdir_lock as lock; "
       "l = lock.WorkdirLock(sys.argv[1]); l.acquire(); print(lock.read_holder(sys.argv[1]).pid);"
       " l.release()", str(tmp_path / "run")],
      cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
  taker = int(result.stdout)
  assert taker != holder.pid
  assert (f"Took over the lock of workdir {tmp_path / 'run'} from a run that has ended "
          f"(host {HOST}, pid {holder.pid}, started ") in result.stderr
  assert not (tmp_path / "run" / ".lock").exists()


def test_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
  for round_ in range(2):
    workdir = tmp_path / f"run{round_}"
    _stale_lock(workdir)
    go, done = tmp_path / f"go{round_}", tmp_path / f"done{round_}"
    racers = [_python(RACE, workdir, go, done) for _ in range(4)]
    try:
      for racer in racers:
        assert racer.stdout.readline().strip() == "ready", racer.stderr.read()
      go.touch()
      outcomes = [racer.stdout.readline().split() for racer in racers]
      winners = [int(o[1]) for o in outcomes if o[0] == "won"]
      assert len(winners) == 1, outcomes
      assert lock.read_holder(workdir).pid == winners[0]
      for outcome in outcomes:  # The losers name the winner, not the dead run.
        assert outcome[0] == "won" or f"pid {winners[0]}," in " ".join(outcome), outcome
      done.touch()
      for racer in racers:
        assert racer.wait(timeout=60) == 0, racer.stderr.read()
    finally:
      for racer in racers:
        racer.kill()
        racer.wait()
    assert not (workdir / ".lock").exists()


def test_threads_racing_for_a_stale_lock_many_times_exactly_one_wins(tmp_path):
  """The same race, more often: each WorkdirLock opens its own file, so threads contend like
  processes do (flock belongs to the open file, not the process)."""
  workdir = tmp_path / "run"
  for _ in range(25):
    _stale_lock(workdir)
    barrier, won, lost = threading.Barrier(6), [], []

    def race():
      held = lock.WorkdirLock(workdir)
      barrier.wait()
      try:
        held.acquire()
        won.append(held)
      except WorkdirLocked as e:
        lost.append(str(e))

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=60)
    assert len(won) == 1 and len(lost) == 5, (won, lost)
    assert lock.read_holder(workdir).started == won[0].holder.started
    won[0].release()
    assert not (workdir / ".lock").exists()


def test_release_removes_the_file_only_while_it_is_ours(tmp_path):
  with lock.WorkdirLock(tmp_path / "new" / "run") as held:  # Creates the workdir too.
    assert lock.read_holder(tmp_path / "new" / "run") == held.holder
    assert held.holder.pid == os.getpid() and held.holder.host == HOST
  assert not held.held and not (tmp_path / "new" / "run" / ".lock").exists()
  assert os.listdir(tmp_path / "new" / "run") == []  # No temporary files left behind.

  held = lock.WorkdirLock(tmp_path / "run")
  held.acquire()
  # Someone deleted the file by hand and another run took the workdir: not ours to remove.
  os.unlink(tmp_path / "run" / ".lock")
  (tmp_path / "run" / ".lock").write_text('{"host": "other"}')
  held.release()
  assert (tmp_path / "run" / ".lock").read_text() == '{"host": "other"}'


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
  content = _stale_lock(tmp_path, host="node-7.cluster")
  with pytest.raises(WorkdirLocked, match=(
      rf"locked by a run on another host \(host node-7.cluster, pid {content['pid']}, started "
      rf"2024-01-01T00:00:00\+00:00\); from {HOST} ftjax cannot tell whether it still runs: "
      rf"if it has ended, delete {tmp_path / '.lock'}$")):
    lock.WorkdirLock(tmp_path).acquire()
  assert json.loads((tmp_path / ".lock").read_text()) == content


def test_an_unreadable_lock_file_is_named_not_taken_over(tmp_path):
  (tmp_path / ".lock").write_text("not json")
  with pytest.raises(WorkdirLocked, match=rf"not readable \({tmp_path / '.lock'}\); if no run "
                     r"uses this workdir, delete it"):
    lock.WorkdirLock(tmp_path).acquire()
  assert (tmp_path / ".lock").read_text() == "not json"


def test_without_file_locks_the_pid_decides_and_nothing_is_taken_over(tmp_path, monkeypatch,
                                                                     holder):
  monkeypatch.setattr(lock, "_try_flock", lambda fd: None)  # A filesystem without flock.
  with pytest.raises(WorkdirLocked, match=rf"in use by another run \(host {HOST}, pid "
                     rf"{holder.pid},"):
    lock.WorkdirLock(tmp_path / "run").acquire()
  content = _stale_lock(tmp_path / "stale")
  with pytest.raises(WorkdirLocked, match=rf"a run that has ended \(host {HOST}, pid "
                     rf"{content['pid']}, .* cannot be taken over safely; delete "):
    lock.WorkdirLock(tmp_path / "stale").acquire()
  # A reused pid (same number, another process start time) counts as ended too.
  reused = {**content, "pid": holder.pid}
  (tmp_path / "stale" / ".lock").write_text(json.dumps(reused))
  with pytest.raises(WorkdirLocked, match="a run that has ended"):
    lock.WorkdirLock(tmp_path / "stale").acquire()


def test_an_unwritable_workdir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(FtjaxError, match=rf"cannot lock workdir {tmp_path / 'file' / 'run'}: .*"
                     r"expected a writable folder"):
    lock.WorkdirLock(tmp_path / "file" / "run").acquire()


def test_hold_in_one_process_yields_the_lock_and_refuses_a_held_workdir(holder, tmp_path):
  with lock.hold(tmp_path / "free") as held:
    assert held.held and lock.read_holder(tmp_path / "free").pid == os.getpid()
  assert not (tmp_path / "free" / ".lock").exists()
  with pytest.raises(WorkdirLocked, match=rf"pid {holder.pid},"):
    with lock.hold(tmp_path / "run"):
      pytest.fail("the body must not run")


# One process of a two-process run: takes the workdir with `hold`, or prints the one line.
HOLD_TWO = """
import os, sys
from jax.experimental import multihost_utils
from ftjax import distributed
from ftjax import workdir_lock as lock
from ftjax.errors import FtjaxError
port, index, workdir = sys.argv[1:]
distributed.initialize(f"127.0.0.1:{port}", 2, int(index), cpu_collectives="gloo")
try:
  with lock.hold(workdir) as held:
    print("lock" if held else "none", os.getpid(), lock.read_holder(workdir).pid, flush=True)
    multihost_utils.sync_global_devices("read")  # Both have read it before process 0 releases.
except FtjaxError as e:
  sys.exit(f"ftjax: error: {e}")
"""


def _two_processes(workdir: pathlib.Path) -> list[subprocess.CompletedProcess]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  pair = [_python(HOLD_TWO, port, i, workdir, env=env) for i in range(2)]
  try:
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate())
            for p in pair]
  finally:
    for p in pair:
      p.kill()
      p.wait()


def test_a_two_process_run_takes_the_lock_once_and_stops_together(holder, tmp_path):
  first, second = _two_processes(tmp_path / "free")
  assert first.returncode == second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
  # Process 0 holds it (and yields it); process 1 gets None and reads process 0's pid.
  # (Gloo prints a line of its own first.)
  (kind0, pid0, holder0), (kind1, _, holder1) = (p.stdout.splitlines()[-1].split()
                                                 for p in (first, second))
  assert (kind0, kind1) == ("lock", "none") and holder0 == holder1 == pid0
  assert not (tmp_path / "free" / ".lock").exists()

  # Held by another run: both processes stop, with the same one line naming it.
  first, second = _two_processes(tmp_path / "run")
  assert first.returncode == second.returncode == 1
  lines = [p.stderr.strip().splitlines()[-1] for p in (first, second)]
  assert lines[0] == lines[1]
  assert lines[0].startswith(f"ftjax: error: workdir {tmp_path / 'run'} is in use by another "
                             f"run (host {HOST}, pid {holder.pid}, started ")
  assert holder.poll() is None and lock.read_holder(tmp_path / "run").pid == holder.pid


def _complete_checkpoints(workdir: pathlib.Path) -> dict[str, bytes]:
  """Every file of every complete checkpoint (orbax renames a finished one to its step)."""
  folder = workdir / "checkpoints"
  return {str(f.relative_to(folder)): f.read_bytes() for step in folder.iterdir()
          if step.name.isdigit() for f in sorted(step.rglob("*")) if f.is_file()}


@pytest.mark.slow
def test_a_second_train_command_on_a_running_workdir_stops_and_the_first_finishes(
    minilm_dir, data_dir, tmp_path):
  """Needs the training core to run inside `lock.hold(workdir)` (ftjax.core.loop does)."""
  from tests import tiny_bert  # pylint: disable=g-import-not-at-top
  model = tiny_bert.make_model(tmp_path / "model", minilm_dir)
  data = tiny_bert.make_data(tmp_path / "data", data_dir)
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "ftjax.main", "--config=configs/sentiment_minilm.py",
             f"--workdir={workdir}", f"--config.model.name_or_path={model}",
             f"--config.data.path={data}", "--config.training.num_steps=12",
             "--config.training.batch_size=16", "--config.training.log_every_steps=1",
             "--config.checkpoint.every_steps=4", "--config.eval.every_steps=12",
             "--config.eval.splits=('validation',)", "--config.data.num_buckets=1",
             "--config.strategy.name=full"]
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": ""}  # One CPU device.
  log = tmp_path / "first.log"
  with open(log, "w", encoding="utf-8") as out:
    first = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=out, env=env)
  try:
    # Once the first run has a complete checkpoint, freeze it (SIGSTOP) so that it surely
    # still runs, holding the lock, while the second command starts and stops.
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints").is_dir() or not _complete_checkpoints(workdir):
      assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    checkpoints = _complete_checkpoints(workdir)
    config = (workdir / "config.json").read_bytes()
    started = time.monotonic()
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=env)
    assert second.returncode == 1, second.stderr[-3000:]
    errors = [l for l in second.stderr.splitlines() if l.startswith("ftjax: error:")]
    assert errors == [second.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith(f"ftjax: error: workdir {workdir} is in use by another run "
                                f"(host {HOST}, pid {first.pid}, started ")
    assert time.monotonic() - started < 120  # Stopped at start-up, before any training.
    # It wrote nothing: the first run's checkpoints and config are as they were.
    assert _complete_checkpoints(workdir) == checkpoints
    assert (workdir / "config.json").read_bytes() == config
    assert lock.read_holder(workdir).pid == first.pid

    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
  finally:
    first.send_signal(signal.SIGCONT)
    first.kill()
    first.wait()
  assert json.loads((workdir / "results.json").read_text())["step"] == 12
  steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()
           if "train/loss" in l]
  assert steps == list(range(1, 13))  # One trajectory, each step logged once.
  assert not (workdir / ".lock").exists()
