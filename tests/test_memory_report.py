"""scripts/memory_report.py on a shrunken Llama: full vs LoRA per-device memory, compiled only."""

import json
import re
import subprocess
import sys

from ftjax.objectives import CausalLM
from tests.conftest import REPO

SMALL = ["--hidden_size=64", "--num_layers=2", "--num_heads=8", "--num_kv_heads=4",
         "--intermediate_size=128", "--vocab_size=512", "--batch_size=8", "--seq_len=32"]


def test_lora_needs_less_memory_per_device_than_full(tmp_path):
  result = subprocess.run(
      [sys.executable, "scripts/memory_report.py", *SMALL, "--strategies=full,lora",
       "--mesh_fsdp=4", "--mesh_tensor=2", f"--json={tmp_path / 'report.json'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]

  # The printed table: a header, then one row per strategy with numbers in every column.
  lines = result.stdout.strip().splitlines()
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 2} on 8 x cpu" in lines[0]
  header = [c.strip() for c in lines[1].strip("|").split("|")]
  assert header[:3] == ["strategy", "trainable params", "arguments (MiB)"]
  printed = {}
  for line in lines[3:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(header), line
    printed[cells[0]] = dict(zip(header[1:], (float(c.replace(",", "")) for c in cells[1:])))
  assert set(printed) == {"full", "lora r=8"}

  rows = {r["strategy"]: r for r in json.loads((tmp_path / "report.json").read_text())}
  full, lora = rows["full"], rows["lora r=8"]
  for name, row in rows.items():
    assert printed[name]["arguments (MiB)"] == round(row["arguments"] / 2**20, 2)
    # The state's bytes per device, from its shardings, are what the step gets and
    # donates (the batch and RNG key are the rest of its arguments).
    assert row["aliased"] == row["state_bytes_from_shardings"]
    # Arguments are exactly the state, this device's rows of the objective's batch
    # (6 int32/float32 arrays of 8 x 32 over the 4 data-parallel fsdp shards): nothing is
    # replicated that should not be. (The RNG key is not an argument: Llama has no
    # dropout, so jit prunes the unused key.)
    batch_bytes = sum(x.dtype.itemsize * x.size
                      for x in CausalLM.batch_spec(8, 32).values()) // 4
    assert batch_bytes == 6 * 2 * 32 * 4
    assert row["arguments"] == row["state_bytes_from_shardings"] + batch_bytes
    # What must fit: more than what is held when the step starts plus its workspace.
    assert row["peak"] >= row["arguments"] + row["temp"] > row["arguments"]
  # LoRA (rank 8) trains A (64 x 8) and B (8 x out) of query (out 8 heads x 8) and value
  # (out 4 kv heads x 8) in both layers; the frozen base has no moments.
  assert lora["trainable_params"] == 2 * (8 * (64 + 64) + 8 * (64 + 32))
  assert full["trainable_params"] == full["total_params"]
  assert lora["arguments"] < full["arguments"]
  # Full holds params + 2 Adam moments (3x); LoRA the params once plus its adapters' 3x
  # (3% of this small model, less sharded than the kernels).
  assert full["state_bytes_from_shardings"] > 2 * lora["state_bytes_from_shardings"]
  assert re.fullmatch(r"\d+ x cpu", full["devices"])
