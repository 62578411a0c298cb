"""One run per workdir: `with lock.hold(workdir): ...` around everything that writes there.

Two runs on one workdir (a queue re-submitting a job that still runs) would
interleave checkpoints of different trajectories, and a resume would pick the
newest. So a run owns its workdir for its lifetime:

  * `<workdir>/.lock` holds JSON naming the holder: host, pid, start time,
    the process's kernel start time (pids get reused) and the command.
  * The holder keeps an exclusive `flock` on that file. The kernel drops it
    when the holder dies, even on SIGKILL, so on the same host "nobody holds
    the flock" means "the run has ended": the next run takes the lock over and
    logs from whom. A run that sees another holder stops with one line naming it.
  * A lock written on another host is never assumed stale (flock need not
    reach across hosts on a network filesystem): the error says so and names
    the file to delete.
  * On a filesystem without file locks, the pid and its start time decide
    whether the holder still runs, and a stale lock is reported, not taken over
    (without flock a take-over cannot be made race-free).

The file is created complete (written to a temporary file, then `os.link`ed
into place, which fails if `.lock` exists: an atomic create-if-absent), and a
take-over `os.rename`s a new file over the old one while holding the old one's
flock, so two runs racing for a stale lock cannot both win. Whoever holds the
flock of the file now at `.lock` owns the workdir.

Multi-host runs take the lock once, on process 0, and share the outcome
(`hold`), so all processes go on or all stop with the same line. Readers (the
evaluator's `--watch`) never take it.
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

from absl import logging

from ftjax.errors import FtjaxError, WorkdirLocked

LOCK_NAME = ".lock"
# flock/link errors meaning "this filesystem does not do that", not "someone holds it".
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL,
                errno.EPERM}
# A holder's file can name a pid that has just died while a successor swaps its
# own file in (microseconds); look again for this long before reporting.
_SETTLE_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a workdir: what `<workdir>/.lock` says."""

  host: str
  pid: int
  started: str  # Local time with its UTC offset, for people.
  command: str = ""
  process_start: int | None = None  # /proc/<pid>/stat field 22 (Linux), against pid reuse.

  def describe(self) -> str:
    return f"host {self.host}, pid {self.pid}, started {self.started}"

  @classmethod
  def this_process(cls) -> "Holder":
    return cls(socket.gethostname(), os.getpid(),
               datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               shlex.join(getattr(sys, "orig_argv", sys.argv)), _process_start(os.getpid()))


def read_holder(workdir: str | os.PathLike) -> Holder | None:
  """The holder named in `<workdir>/.lock`, or None if there is no (readable) lock file.

  Says who took the lock, not whether they still run: for reports only.
  """
  try:
    with open(pathlib.Path(workdir) / LOCK_NAME, "rb") as f:
      return _parse(f.read())
  except FileNotFoundError:
    return None


class WorkdirLock:
  """Exclusive ownership of one workdir by this process; a context manager.

  `__enter__` acquires (creating the workdir if needed) or raises
  `WorkdirLocked` naming the holder; `__exit__` releases: it removes
  `.lock` only if the file there is still ours.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_NAME
    self.holder: Holder | None = None  # Ours, once acquired.
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    if self._fd is not None:
      raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
    self.holder = Holder.this_process()
    if self.workdir.exists() and not self.workdir.is_dir():
      raise FtjaxError(f"workdir {self.workdir} is a file; expected a folder (a new one, or "
                       f"the workdir of a run)")
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._fd = self._acquire()
    except OSError as e:
      raise FtjaxError(f"cannot lock workdir {self.workdir}: {e.strerror or e} "
                       f"({e.filename or self.path}); expected a writable folder") from None

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      if _is_at(fd, self.path):  # Ours until we close fd: nobody else can have replaced it.
        os.unlink(self.path)
    finally:
      os.close(fd)  # Drops the flock.

  def _acquire(self) -> int:
    """Our flocked file descriptor, now at `.lock`; raises WorkdirLocked."""
    deadline = time.monotonic() + _SETTLE_SECONDS
    while True:
      fd = self._create()
      if fd is not None:
        return fd
      try:
        theirs = os.open(self.path, os.O_RDWR)  # Writable: NFS emulates flock with write locks.
      except FileNotFoundError:
        continue  # Released since: create it again.
      try:
        fd = self._take_over(theirs, deadline)
      finally:
        os.close(theirs)
      if fd is not None:
        return fd

  def _create(self) -> int | None:
    """Creates `.lock` complete and flocked; None if one exists."""
    fd, tmp = self._write_ours()
    try:
      os.link(tmp, self.path)  # Fails if `.lock` exists: the atomic create.
      return fd
    except OSError as e:
      os.close(fd)
      if e.errno in _UNSUPPORTED:
        return self._create_without_link()
      if isinstance(e, FileExistsError):
        return None
      raise
    finally:
      os.unlink(tmp)

  def _take_over(self, theirs: int, deadline: float) -> int | None:
    """The existing lock file open as `theirs`: ours if its holder has ended (returns our fd),
    None to look again (it changed meanwhile), or raises WorkdirLocked naming the holder."""
    holder = _parse(os.pread(theirs, 1 << 16, 0))
    locked = _try_flock(theirs)
    if not _is_at(theirs, self.path):
      time.sleep(0.001)
      return None  # Its owner removed or replaced it since we opened it.
    if locked is False:
      # Alive, unless a successor is swapping its own file in for a dead holder's right now.
      if holder is not None and not _alive(holder) and time.monotonic() < deadline:
        time.sleep(0.02)
        return None
      raise WorkdirLocked(self._in_use(holder))
    if holder is None:
      raise WorkdirLocked(f"workdir {self.workdir} has a lock file that is not readable "
                          f"({self.path}); if no run uses this workdir, delete it")
    if holder.host != socket.gethostname():
      raise WorkdirLocked(
          f"workdir {self.workdir} is locked by a run on another host ({holder.describe()}); "
          f"from {socket.gethostname()} ftjax cannot tell whether it still runs: if it has "
          f"ended, delete {self.path}")
    if locked is None:  # No file locks here: the pid decides, and nothing is taken over.
      if _alive(holder):
        raise WorkdirLocked(self._in_use(holder))
      raise WorkdirLocked(
          f"workdir {self.workdir} is locked by a run that has ended ({holder.describe()}) "
          f"on a filesystem without file locks, where it cannot be taken over safely; "
          f"delete {self.path}")
    # The holder is gone and we hold its flock, so nobody else can take over: swap our
    # file in before letting go of theirs.
    fd, tmp = self._write_ours()
    try:
      os.rename(tmp, self.path)
    except BaseException:
      os.close(fd)
      os.unlink(tmp)
      raise
    logging.warning("Took over the lock of workdir %s from a run that has ended (%s)",
                    self.workdir, holder.describe())
    return fd

  def _write_ours(self) -> tuple[int, str]:
    """A temporary file beside `.lock`, flocked (where supported) and holding our JSON."""
    fd, tmp = tempfile.mkstemp(prefix=LOCK_NAME + ".", suffix=".tmp", dir=self.workdir)
    try:
      _try_flock(fd)
      os.write(fd, self._content())
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      os.unlink(tmp)
      raise
    return fd, tmp

  def _create_without_link(self) -> int | None:
    """For filesystems without hard links: an exclusive create, then the content. Not atomic:
    a racing reader may find the file empty and stop, which is safe."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return None
    _try_flock(fd)
    os.write(fd, self._content())
    os.fsync(fd)
    return fd

  def _content(self) -> bytes:
    return json.dumps(dataclasses.asdict(self.holder)).encode() + b"\n"

  def _in_use(self, holder: Holder | None) -> str:
    who = holder.describe() if holder else f"its lock file {self.path} is not readable yet"
    return (f"workdir {self.workdir} is in use by another run ({who}); wait for it to end, "
            f"or use another --workdir")


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[WorkdirLock | None]:
  """Owns `workdir` for the body, for all processes of a (multi-host) run.

  Process 0 takes the lock and shares the outcome: every process goes on, or
  every process raises the same one-line `WorkdirLocked` (or `FtjaxError`).
  Yields the lock on process 0, None on the others. Call it after
  `jax.distributed.initialize` and before anything writes into the workdir.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the lock itself needs no JAX)

  lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
  kind, error = _OK, None
  try:
    if lock is not None:
      lock.acquire()
  except WorkdirLocked as e:
    kind, error = _LOCKED, e
  except FtjaxError as e:
    kind, error = _USER_ERROR, e
  except BaseException as e:  # A bug: still tell the others, so they do not wait forever.
    kind, error = _BUG, e
  message = str(error) if error is not None else ""
  if jax.process_count() > 1:
    kind, message = _share(kind, message)
  if error is not None:
    raise error
  if kind == _LOCKED:
    raise WorkdirLocked(message)
  if kind == _USER_ERROR:
    raise FtjaxError(message)
  if kind == _BUG:
    raise RuntimeError(f"process 0 failed to lock workdir {workdir}: {message}")
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()


_OK, _LOCKED, _USER_ERROR, _BUG = range(4)
_MESSAGE_BYTES = 2048


def _share(kind: int, message: str) -> tuple[int, str]:
  """Process 0's (kind, message) on every process (fixed-size arrays, as the broadcast needs)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  encoded = message.encode()[:_MESSAGE_BYTES]
  payload = np.zeros(_MESSAGE_BYTES + 1, np.int32)
  payload[0] = kind
  payload[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(payload))
  text = bytes(shared[1:].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
  return int(shared[0]), text


def _parse(content: bytes) -> Holder | None:
  try:
    fields = json.loads(content)
    holder = Holder(**{f.name: fields[f.name] for f in dataclasses.fields(Holder)
                       if f.name in fields})
  except (ValueError, TypeError):
    return None
  return holder if isinstance(holder.host, str) and isinstance(holder.pid, int) else None


def _try_flock(fd: int) -> bool | None:
  """Takes the exclusive flock without waiting: True; held by another: False; no file locks
  on this filesystem: None."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  except OSError as e:
    if e.errno in _UNSUPPORTED:
      return None
    raise


def _is_at(fd: int, path: pathlib.Path) -> bool:
  """Whether `path` is (still) the file open as `fd`."""
  try:
    here = os.stat(path)
  except FileNotFoundError:
    return False
  mine = os.fstat(fd)
  return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _process_start(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), or None."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  # Field 2 (the command name) may hold spaces and parentheses: count from its last ")".
  fields = stat[stat.rindex(")") + 2:].split()
  return int(fields[19])  # Field 22 of the whole line.


def _alive(holder: Holder) -> bool:
  """Whether the holder's process still runs; a holder on another host is assumed to."""
  if holder.host != socket.gethostname():
    return True
  try:
    os.kill(holder.pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Exists, under another user.
  start = _process_start(holder.pid)
  return start is None or holder.process_start is None or start == holder.process_start
