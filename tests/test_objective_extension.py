"""The extension point is real: an objective the core has never seen, defined in this file.

`Regression` fits a real-valued target with a mean-squared-error loss on a
tiny BERT's one-output head (rotten_tomatoes' labels read as numbers), with
a config key of its own (`objective.target_scale`) and trainable parameters
of its own (an output scale and offset, kept under `trainable["objective"]`).
It is registered here and trained through `python -m ftjax.main` (a config
file imports this module), stopped with a checkpoint, and resumed: nothing
in `ftjax/` knows it.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ftjax import checkpoint, logs, objectives
from ftjax.data import pipeline
from ftjax.objectives import base
from ftjax.objectives.classification import text_data
from tests import tiny_bert
from tests.conftest import REPO


@objectives.register
class Regression(base.Objective):
  """MSE regression of `target_scale * label` from the model's single output."""

  name = "regression"
  head = "classification"  # a one-output sequence head: model.num_labels=1
  metrics = ("loss", "mse")

  @classmethod
  def config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"target_scale": 1.0})

  @staticmethod
  def batch_spec(batch_size, length):
    return {"input_ids": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
            "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "weights": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def build_data(self, model, tokenizer):
    assert model.config.num_labels == 1, "set model.num_labels=1"
    return text_data(self.config, tokenizer, num_labels=2)  # labels 0/1 as numbers

  def init_params(self, model, rng):
    return {"scale": jnp.ones(()), "offset": jnp.zeros(())}

  def _squared_errors(self, model, params, objective_params, batch, rng, deterministic):
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    out = model.apply(params, batch["input_ids"], batch["attention_mask"],
                      deterministic=deterministic, rngs=rngs,
                      **pipeline.token_types(batch)).logits[:, 0]
    prediction = objective_params["scale"] * out + objective_params["offset"]
    target = self.config.objective.target_scale * batch["labels"].astype(jnp.float32)
    return (prediction - target) ** 2 * batch["weights"]

  def loss(self, model, params, objective_params, refs, batch, *, rng, deterministic,
           normalizer):
    se = self._squared_errors(model, params, objective_params, batch, rng, deterministic)
    return se.sum() / jnp.maximum(normalizer, 1.0), {"se": se.sum(),
                                                     "weight": batch["weights"].sum()}

  def step_metrics(self, sums):
    return {"mse": sums["se"] / jnp.maximum(sums["weight"], 1.0)}

  def eval_outputs(self, model, params, objective_params, refs, batch):
    se = self._squared_errors(model, params, objective_params, batch, None, True)
    return {"se": se.sum(), "weight": batch["weights"].sum()}

  def eval_metrics(self, outputs):
    mse = float(sum(o["se"] for o in outputs) / max(sum(o["weight"] for o in outputs), 1.0))
    return {"loss": mse, "mse": mse}


CONFIG_FILE = '''
import sys
sys.path.insert(0, {repo!r})
import tests.test_objective_extension  # registers "regression"
from ftjax import config as config_lib


def get_config():
  c = config_lib.default_config()
  c.objective.name = "regression"
  c.objective.target_scale = 2.0
  c.model.name_or_path = {model!r}
  c.model.num_labels = 1
  c.data.path = {data!r}
  c.data.max_length = 32
  c.data.num_buckets = 1
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 0
  c.training.batch_size = 16
  c.training.num_steps = 12
  c.training.log_every_steps = 1
  c.eval.splits = ("validation",)
  c.eval.metric = "validation/mse"
  c.eval.mode = "min"
  c.eval.every_steps = 6
  c.eval.at_start = True
  c.eval.batch_size = 32
  return c
'''


def _main(config_file, workdir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "ftjax.main", f"--config={config_file}", f"--workdir={workdir}",
       *extra], cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_a_new_objective_trains_checkpoints_and_resumes_through_main(tmp_path, minilm_dir,
                                                                     data_dir):
  model = tiny_bert.make_model(tmp_path / "model", minilm_dir)
  data = tiny_bert.make_data(tmp_path / "data", data_dir)
  config_file = tmp_path / "regression.py"
  config_file.write_text(CONFIG_FILE.format(repo=str(REPO), model=str(model), data=str(data)))
  workdir = tmp_path / "run"

  first = _main(config_file, workdir, "--stop_at_step=6")
  assert first.returncode == 0, first.stderr[-3000:]
  assert checkpoint.Checkpointer(workdir, _saved_config(workdir), read_only=True).latest_step() \
      == 6
  second = _main(config_file, workdir)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resumed from" in second.stderr and "at step 6" in second.stderr

  rows = logs.read_metrics(workdir)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))
  assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
  evals = [r["validation/mse"] for r in rows if "validation/mse" in r]
  assert len(evals) == 3 and evals[2] < evals[1] < evals[0], evals  # steps 0, 6, 12
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 12 and results["validation/mse"] == evals[-1]
  saved = json.loads((workdir / "config.json").read_text())
  # The module that registers the objective is recorded, so the evaluator finds it too.
  assert saved["objective"] == {"name": "regression", "target_scale": 2.0,
                                "module": "tests.test_objective_extension"}
  # Imported here: a config file imports this module inside `ftjax.main`, whose flags
  # would clash with the evaluator's.
  from ftjax import evaluate  # pylint: disable=g-import-not-at-top
  rows = evaluate.run_evaluator(str(workdir), checkpoints="latest", split="validation",
                                devices=jax.devices()[:1])
  assert rows[0]["validation/mse"] == pytest.approx(evals[-1], rel=1e-5)

  # The objective's own parameters were trained and checkpointed beside the model's.
  trainable = checkpoint.read_trainable(workdir, 12)
  assert {"objective/scale", "objective/offset"} <= set(trainable)
  assert float(trainable["objective/scale"]) != 1.0
  assert "classifier/out/kernel" in trainable


def _saved_config(workdir: pathlib.Path):
  from ftjax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_run_config(workdir, [])
