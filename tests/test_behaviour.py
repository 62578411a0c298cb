"""Behaviour is unchanged: three short runs end where the code before the trainer redesign did.

The fixtures under `tests/fixtures/behaviour/` were written by this file (with
`FTJAX_WRITE_BEHAVIOUR_FIXTURES=1`) from the code *before* the core/objectives
redesign: the final trainable parameters and every logged metric of

  * `bert_full`: a tiny random BERT (dropout 0.1) fully fine-tuned for
    classification with 2-way gradient accumulation;
  * `bert_lora`: the same with LoRA (rank 4, adapter dropout 0.1);
  * `llama_instruct`: a tiny random Llama instruction-tuned on a two-task
    mixture (code + GSM8K) with packing and generation-based exact match.

The runs must see the same batches (the logged data fingerprints), end with
parameters equal within 1e-6 (max abs, float32) and log the same metrics to
4 decimals. The models and tokenizer are made from fixed seeds by the
test helpers (torch's generator for the weights, a deterministic BPE trainer),
so the inputs are the same on every machine with the pinned torch.
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from ftjax import checkpoint, logs, train
from tests import tiny

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "behaviour"
WRITE = os.environ.get("FTJAX_WRITE_BEHAVIOUR_FIXTURES") == "1"
# Wall-clock keys differ run to run; everything else is compared.
TIMING = ("examples_per_second", "seconds_per_step", "wall_seconds")
# Metrics logged since the fixtures were written (they add a row key; they
# change no value the fixtures hold).
ADDED_SINCE = frozenset({"params/bytes"})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, minilm_dir, data_dir) -> pathlib.Path:
  root = tmp_path_factory.mktemp("behaviour")
  tiny.make_model(root / "bert", minilm_dir)
  tiny.make_data(root / "data", data_dir)
  tiny.make_tokenizer(root / "tok", data_dir)
  tiny.make_decoder(root / "llama", root / "tok")
  tiny.make_instruct_data(root / "code", data_dir, "instruction")
  tiny.make_instruct_data(root / "math", data_dir, "multitask")
  return root


def _config(name: str, root: pathlib.Path):
  if name == "bert_full":
    return tiny.config(root / "bert", root / "data", **{"optimizer.accumulation_steps": 2})
  if name == "bert_lora":
    return tiny.config(root / "bert", root / "data", **{
        "strategy.name": "lora", "strategy.lora.rank": 4, "strategy.lora.dropout": 0.1})
  assert name == "llama_instruct"
  return tiny.lm_config(root / "llama", **{
      "data.mixture": (("code", str(root / "code"), 1.0), ("math", str(root / "math"), 1.0)),
      "data.packing": True, "eval.generate_examples": 2, "eval.max_new_tokens": 8,
      "training.num_steps": 4, "eval.every_steps": 2})


def _rows(workdir: pathlib.Path) -> list[dict]:
  return [{k: v for k, v in row.items() if not k.endswith(TIMING) and k not in ADDED_SINCE}
          for row in logs.read_metrics(workdir)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert_full", "bert_lora", "llama_instruct"])
def test_run_ends_where_it_did_before_the_redesign(inputs, tmp_path, name):
  config = _config(name, inputs)
  workdir = tmp_path / name
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  step = config.training.num_steps
  params = {p: np.asarray(v, np.float32)
            for p, v in checkpoint.read_trainable(workdir, step).items()}
  rows = _rows(workdir)
  if WRITE:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURES / f"{name}.npz", **{p.replace("/", "|"): v
                                                      for p, v in params.items()})
    (FIXTURES / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return

  expected_rows = json.loads((FIXTURES / f"{name}.json").read_text())
  fingerprints = [r["train/data_fingerprint"] for r in rows if "train/data_fingerprint" in r]
  assert fingerprints == [r["train/data_fingerprint"] for r in expected_rows
                          if "train/data_fingerprint" in r]
  assert len(fingerprints) == step
  assert [r["step"] for r in rows] == [r["step"] for r in expected_rows]
  for row, expected in zip(rows, expected_rows):
    assert set(row) == set(expected), (row["step"], set(row) ^ set(expected))
    for key, value in expected.items():
      if isinstance(value, float):
        # To 4 decimals, or 1e-5 relative for large values (a perplexity near
        # 2000 moves in its 4th decimal with float32 summation order).
        assert row[key] == pytest.approx(value, rel=1e-5, abs=1.5e-4), (row["step"], key)
      else:
        assert row[key] == value, (row["step"], key)

  with np.load(FIXTURES / f"{name}.npz") as saved:
    expected_params = {p.replace("|", "/"): saved[p] for p in saved.files}
  assert set(params) == set(expected_params)
  worst = max(float(np.max(np.abs(params[p] - v))) for p, v in expected_params.items())
  assert worst <= 1e-6, worst
