"""Atomic writes (`ftjax.files`): all or nothing, no temporary file left, a normal file mode."""

import os

from ftjax import files


def test_atomic_writes_leave_no_temporary_file_and_a_normal_mode(tmp_path):
  path = files.atomic_write_text(tmp_path / "results.json", "{}\n")
  assert path.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
  umask = os.umask(0)
  os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask

  def fail(tmp):
    raise OSError("disk full")

  try:
    files.atomic_write(tmp_path / "results.json", fail)
  except OSError:
    pass
  assert path.read_text() == "{}\n" and len(list(tmp_path.iterdir())) == 1
