"""What the multi-run studies in `experiments/` share: one run as a logged subprocess."""

import pathlib
import subprocess
import time

from ftjax.errors import FtjaxError


def run_logged(name: str, run_dir: pathlib.Path, command: list[str], *, cwd: pathlib.Path) -> None:
  """Runs `command` (a `python -m ftjax.main ...`), its output appended to `run_dir/log.txt`.

  Appended, not overwritten: a resumed run keeps the log of its first part.
  A failure is one `FtjaxError` line quoting the log's last line.
  """
  run_dir.mkdir(parents=True, exist_ok=True)
  log_path = run_dir / "log.txt"
  print(f"run {name}: log in {log_path}", flush=True)
  started = time.perf_counter()
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    returncode = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                check=False).returncode
  if returncode:
    lines = [l.strip() for l in log_path.read_text(encoding="utf-8").splitlines() if l.strip()]
    raise FtjaxError(f"run {name} failed (exit {returncode}): "
                     f"{lines[-1] if lines else 'no output'}; log: {log_path}")
  print(f"done {name} in {time.perf_counter() - started:.0f}s", flush=True)
