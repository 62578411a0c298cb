"""scripts/benchmark.py: the MFU table on a tiny BERT, and the FLOP counts it divides by."""

import json
import os
import subprocess
import sys

import pytest

from tests import tiny
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import model_flops  # pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = ["model", "strategy", "batch x lengths", "step (ms, median)", "real tokens/s",
           "padded tokens/s", "compile (s)", "peak memory (MiB)", "XLA temp+args (MiB)",
           "GFLOP/step", "MFU", "6N MFU", "load (1 min)"]


def test_benchmark_table_on_a_tiny_bert(tmp_path, minilm_dir, data_dir):
  model = tiny.make_model(tmp_path / "model", minilm_dir, num_layers=2)
  data = tiny.make_data(tmp_path / "data", data_dir, sizes=(("train", 64),))
  out = tmp_path / "out"
  # One device, as a user runs it (conftest's 8 fake devices would make the
  # step an 8-way SPMD program).
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "scripts/benchmark.py", "--models=minilm", "--strategies=full",
       "--steps=2", "--batch_size=8", f"--minilm={model}", f"--set=data.path={data}",
       "--set=data.num_buckets=1", "--matmul_size=256", f"--out={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]

  lines = result.stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
  header = [c.strip() for c in lines[start].strip("|").split("|")]
  assert header == COLUMNS
  cells = [c.strip() for c in lines[start + 2].strip("|").split("|")]
  assert len(cells) == len(COLUMNS), lines[start + 2]
  row = dict(zip(COLUMNS, cells))
  assert (row["model"], row["strategy"], row["batch x lengths"]) == ("minilm", "full", "8 x 64")
  assert 0 < float(row["MFU"].rstrip("%")) <= 100
  assert row["MFU"] == row["6N MFU"]  # Full fine-tuning needs all of MaxText's count.
  assert float(row["step (ms, median)"]) > 0
  assert "float32 256x256 @ 256x256" in lines[0]
  assert (out / "benchmark.md").read_text().strip() == result.stdout.strip()

  report = json.loads((out / "benchmark.json").read_text())
  # The command to reproduce the table, with the environment that changes what XLA runs.
  assert report["command"].startswith("JAX_PLATFORMS=cpu python scripts/benchmark.py "
                                      "--models=minilm")
  peak = report["peak_flops_per_second"]
  assert peak == max(r["peak"]["matmul_flops_per_second"] for r in report["rows"])
  (full,) = report["rows"]
  assert 0 < full["flops_per_second_needed"] / peak <= 1
  assert len(full["step_seconds"]) == 2 and full["compile_seconds"] > 0
  # Sentences of rotten_tomatoes padded to 64 tokens: most of a row is padding.
  assert 0 < full["real_tokens_per_second"] < 0.8 * full["padded_tokens_per_second"]
  assert full["peak_rss_bytes"] > full["xla_temp_plus_argument_bytes"] > 0
  assert full["model_flops_per_step_needed"] == full["model_flops_per_step_maxtext"] > 0
  assert full["trainable_params"] == full["total_params"]


# --- The FLOP counts --------------------------------------------------------------

BERT = model_flops.Architecture(
    num_layers=2, emb_dim=64, num_query_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=256,
    num_mlp_inputs=1, vocab_size=0, causal=False, pre_norm=False, windows=(None, None),
    head_dims=(("pooler", 64, 64), ("classifier/out", 64, 2)), layers_prefix="encoder/layers",
    mlp_in=("up",), word_embedding="", lm_head="")
LLAMA = model_flops.Architecture(
    num_layers=2, emb_dim=64, num_query_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
    num_mlp_inputs=2, vocab_size=1000, causal=True, pre_norm=True, windows=(None, None),
    head_dims=(), layers_prefix="decoder/layers", mlp_in=("gate", "up"),
    word_embedding="embeddings/word/embedding", lm_head="")


def _bert_paths(arch):
  paths = {"embeddings/word/embedding", "embeddings/norm/scale", "pooler/kernel",
           "pooler/bias", "classifier/out/kernel", "classifier/out/bias"}
  for i in range(arch.num_layers):
    for module in ("attention/query", "attention/key", "attention/value", "attention/output",
                   "mlp/up", "mlp/down"):
      paths |= {f"encoder/layers/{i}/{module}/kernel", f"encoder/layers/{i}/{module}/bias"}
    paths |= {f"encoder/layers/{i}/attention_norm/scale", f"encoder/layers/{i}/mlp_norm/scale"}
  return paths


def test_maxtext_count_of_a_llama_by_hand():
  b, s, layers = 3, 32, 2
  ffn = 2 * b * s * 128 * 64 * 2 + 2 * b * s * 128 * 64      # gate + up, then down
  qkv = 2 * b * s * 64 * (4 + 2 * 2) * 16                     # GQA: 2 kv heads
  projection = 2 * b * s * 64 * 4 * 16
  causal_attention = 4 * b * s * s * 4 * 16 / 2
  logits = 2 * b * s * 64 * 1000
  expected = 3 * ((ffn + qkv + projection) * layers + logits) + 3 * causal_attention * layers
  assert model_flops.maxtext_flops(LLAMA, b, s) == expected
  # Bidirectional attention (an encoder) is not halved.
  assert model_flops._attention_flops(BERT, b, s, None) == 4 * b * s * s * 4 * 16  # pylint: disable=protected-access


def test_needed_flops_by_strategy():
  b, s = 8, 40
  every = _bert_paths(BERT)
  full = model_flops.maxtext_flops(BERT, b, s)
  assert model_flops.needed_flops(BERT, every, b, s) == full
  # Head-only: a forward pass, plus the classifier's weight gradient.
  head = {"classifier/out/kernel", "classifier/out/bias"}
  forward = full / 3
  assert model_flops.needed_flops(BERT, head, b, s) == pytest.approx(
      forward + 2 * b * 64 * 2, rel=1e-12)
  # Freezing the embeddings and layer 0: layer 0 runs forward only, layer 1's
  # q/k/v form weight but no input gradients; everything above is 3x.
  freeze = {p for p in every if not p.startswith(("embeddings/", "encoder/layers/0/"))}
  tokens = b * s
  layer_matmuls = 2 * tokens * (4 * 64 * 64 + 2 * 64 * 256)
  attention = model_flops._attention_flops(BERT, b, s, None)  # pylint: disable=protected-access
  qkv_input_gradients = 3 * 2 * tokens * 64 * 64
  head_matmuls = 2 * b * (64 * 64 + 64 * 2)
  assert model_flops.needed_flops(BERT, freeze, b, s) == pytest.approx(
      (layer_matmuls + attention) * (1 + 3) - qkv_input_gradients + 3 * head_matmuls, rel=1e-12)
  # LoRA on query/value: more than head-only (backward through every layer
  # above the first adapter), less than full (no frozen weight gradients).
  lora = head | {f"encoder/layers/{i}/attention/{m}/lora_{x}"
                 for i in range(2) for m in ("query", "value") for x in "ab"}
  needed_lora = model_flops.needed_flops(BERT, lora, b, s, lora_rank=4)
  assert model_flops.needed_flops(BERT, head, b, s) < needed_lora < full


def test_needed_flops_of_a_tied_causal_lm():
  b, s = 2, 16
  paths = {"embeddings/word/embedding", "final_norm/scale"}
  for i in range(2):
    paths |= {f"decoder/layers/{i}/{m}/kernel" for m in (
        "attention/query", "attention/key", "attention/value", "attention/output", "mlp/gate",
        "mlp/up", "mlp/down")}
  assert model_flops.needed_flops(LLAMA, paths, b, s) == model_flops.maxtext_flops(LLAMA, b, s)
  # Only the (tied) embedding trains: the logits matmul forms its weight
  # gradient, and the backward pass reaches every layer (the input embeddings).
  only_embedding = model_flops.needed_flops(LLAMA, {"embeddings/word/embedding"}, b, s)
  assert only_embedding == model_flops.maxtext_flops(LLAMA, b, s) - sum(
      2 * b * s * n_in * n_out for n_in, n_out in ((64, 64), (64, 32), (64, 32), (64, 64),
                                                   (64, 128), (64, 128), (128, 64))) * 2
