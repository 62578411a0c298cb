"""Files written whole or not at all: a temporary name in the same folder, then a rename.

A crash (or kill -9) mid-write leaves the previous file (or none), never half
of a new one: config.json, results.json, metrics.jsonl rewritten on resume,
exported weights, cached features.
"""

import os
import pathlib
import tempfile
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> pathlib.Path:
  """Calls `write(temporary_path)`, then renames the result onto `path`."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  os.close(fd)
  try:
    write(tmp)
    # mkstemp creates 0600; give the file the mode a plain open() would have.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  return atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask
