"""The fine-tuning core on a tiny real run: freezing, partitions, sharding, resume."""

import json
import math

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ftjax import checkpoint, logs, optim, sharding, train
from ftjax.data import pipeline
from ftjax.errors import ConfigError, FtjaxError
from ftjax.models import keymap
from ftjax.core import hooks as hooks_lib
from ftjax.core.hooks import Tracker
from ftjax.objectives import Classification
from ftjax.peft import partition
from tests import tiny


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("tiny")
  return (tiny.make_model(root / "model", minilm_dir),
          tiny.make_data(root / "data", data_dir),
          tiny.make_model(root / "model_no_dropout", minilm_dir, dropout=0.0))


def _steps(run, num_steps):
  """Runs `num_steps` jitted train steps; returns the final state and the losses."""
  train_step, _ = train.compile_steps(run)
  iterator = pipeline.train_iterator(run.train_split, global_batch_size=run.config.training.batch_size,
                                     buckets=run.buckets, seed=run.config.seed, num_epochs=1,
                                     pad_id=run.pad_id)
  state, losses = run.initial_state, []
  rng = jax.random.key(run.config.seed)
  for _ in range(num_steps):
    state, m = train_step(state, run.device_batch(run.config.data.train_split, next(iterator)),
                          rng)
    losses.append(float(m["loss"]))
  return state, losses


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


@pytest.mark.parametrize("strategy", [
    {"strategy.name": "freeze", "strategy.freeze_layers": 2},
    {"strategy.name": "head_only"},
    {"strategy.name": "lora", "strategy.lora.rank": 4},
], ids=lambda s: s["strategy.name"])
def test_frozen_leaves_never_change_and_have_no_optimizer_state(tiny_dirs, strategy):
  model_dir, data_path, _ = tiny_dirs
  run = train.setup(tiny.config(model_dir, data_path, **strategy), jax.devices()[:1])
  frozen_before = _copy(run.initial_state.frozen)
  trainable_before = _copy(run.initial_state.trainable)
  assert keymap.flatten(frozen_before) and keymap.flatten(trainable_before)
  state, _ = _steps(run, 3)

  for path, before in keymap.flatten(frozen_before).items():
    np.testing.assert_array_equal(keymap.flatten(state.frozen)[path], before, err_msg=path)
  changed = {p: not np.array_equal(keymap.flatten(state.trainable)[p], before)
             for p, before in keymap.flatten(trainable_before).items()}
  assert all(changed.values()), [p for p, c in changed.items() if not c]

  # Adam keeps two moments per *trainable* value, plus a few scalar counters.
  trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable_before))
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen_before))
  state_bytes = optim.state_bytes(state.opt_state)
  assert 2 * trainable_bytes <= state_bytes <= 2 * trainable_bytes + 64
  assert state_bytes < frozen_bytes or strategy["strategy.name"] == "freeze"

  if strategy["strategy.name"] == "freeze":
    assert all(p.startswith(("embeddings/", "encoder/layers/0/", "encoder/layers/1/"))
               for p in keymap.flatten(frozen_before))
  if strategy["strategy.name"] == "lora":
    assert all(p.endswith(("lora_a", "lora_b")) or p.startswith("classifier/")
               for p in keymap.flatten(trainable_before))


def test_partition_must_cover_every_parameter(tiny_dirs):
  model_dir, data_path, _ = tiny_dirs
  config = tiny.config(model_dir, data_path)
  from ftjax import models  # pylint: disable=g-import-not-at-top
  model = models.Model.build(models.config_from_pretrained(str(model_dir), task="classification",
                                                           num_labels=2))
  paths = list(model.param_axes)
  with pytest.raises(ConfigError, match="parameter 'embeddings/norm/bias' is not covered"):
    partition.labels(paths, [(r"encoder/.*", "trainable"), (r"classifier/.*", "frozen"),
                             (r"pooler/.*", "frozen"), (r"embeddings/(word|position|token_type)/.*",
                                                        "frozen")])
  with pytest.raises(ConfigError, match="freeze_layers=5 but the model has 4 layers"):
    config.strategy.name = "freeze"
    config.strategy.freeze_layers = 5
    partition.strategy_rules(config.strategy, num_layers=4)
  config.strategy.name = "freeze"
  config.strategy.freeze_layers = 3
  config.strategy.rules = ((r"encoder/layers/0/attention_norm/.*", "trainable"),)
  labels = partition.labels(paths, partition.strategy_rules(config.strategy, num_layers=4))
  assert labels["encoder/layers/0/attention_norm/scale"] == "trainable"  # user rule first
  assert labels["encoder/layers/0/mlp_norm/scale"] == "frozen"
  assert labels["encoder/layers/2/attention/query/kernel"] == "frozen"
  assert labels["encoder/layers/3/attention/query/kernel"] == "trainable"
  assert labels["embeddings/word/embedding"] == "frozen"


def test_accumulation_equals_one_big_batch(tiny_dirs):
  _, data_path, model_dir = tiny_dirs  # no dropout: both runs see the same function
  states = []
  for accumulation in (1, 4):
    config = tiny.config(model_dir, data_path, **{"optimizer.accumulation_steps": accumulation})
    state, losses = _steps(train.setup(config, jax.devices()[:1]), 2)
    states.append((keymap.flatten(_copy(state.trainable)), losses))
  (one, losses_one), (four, losses_four) = states
  np.testing.assert_allclose(losses_four, losses_one, atol=1e-6)
  for path in one:
    np.testing.assert_allclose(four[path], one[path], atol=1e-6, err_msg=path)


SHARDING_RUN = {"training.num_steps": 5, "eval.every_steps": 5, "eval.splits": ("validation",)}


def _losses(workdir):
  return [r["train/loss"] for r in logs.read_metrics(workdir) if "train/loss" in r]


@pytest.fixture(scope="module")
def one_device_losses(tiny_dirs, tmp_path_factory):
  model_dir, data_path, _ = tiny_dirs
  workdir = tmp_path_factory.mktemp("one_device")
  train.train_and_evaluate(tiny.config(model_dir, data_path, **SHARDING_RUN), str(workdir),
                           devices=jax.devices()[:1])
  return _losses(workdir)


# Pure data parallel (data=8) is the reference of tests/test_parallelism.py, which
# compares tensor and FSDP meshes with it; here 4x2 (data x tensor) and 8x1 against 1 device.
@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"mesh.data": 4, "mesh.tensor": 2}, {"mesh.data": 8}], ids=str)
def test_sharded_run_equals_one_device_and_is_really_sharded(tiny_dirs, tmp_path, mesh,
                                                             one_device_losses):
  model_dir, data_path, _ = tiny_dirs
  overrides = SHARDING_RUN
  train.train_and_evaluate(tiny.config(model_dir, data_path, **overrides, **mesh),
                           str(tmp_path / "many"))
  assert len(one_device_losses) == 5
  np.testing.assert_allclose(_losses(tmp_path / "many"), one_device_losses, atol=1e-5)

  run = train.setup(tiny.config(model_dir, data_path, **overrides, **mesh))
  state, _ = _steps(run, 1)
  query = state.trainable["encoder"]["layers"][0]["attention"]["query"]["kernel"]
  up = state.trainable["encoder"]["layers"][0]["mlp"]["up"]["kernel"]
  word = state.trainable["embeddings"]["word"]["embedding"]
  tensor = "tensor" if mesh.get("mesh.tensor", 1) > 1 else None
  fsdp = "fsdp" if mesh.get("mesh.fsdp", 1) > 1 else None
  assert query.sharding.spec == P(fsdp, tensor, None)   # (embed, heads, kv)
  assert up.sharding.spec == P(fsdp, tensor)            # (embed, mlp)
  assert word.sharding.spec == P(tensor, fsdp)          # (vocab, embed)
  # Optimizer moments live where their parameters live.
  mu = state.opt_state[1][0].mu["encoder"]["layers"][0]["mlp"]["up"]["kernel"]
  assert mu.sharding == up.sharding
  # Each device holds 1/(tensor x fsdp) of the embedding table.
  assert word.addressable_shards[0].data.shape == (30522 // mesh.get("mesh.tensor", 1),
                                                   32 // mesh.get("mesh.fsdp", 1))


def test_resume_continues_exactly(tiny_dirs, tmp_path):
  model_dir, data_path, _ = tiny_dirs
  overrides = {"checkpoint.every_steps": 3, "eval.splits": ("validation",)}
  config = tiny.config(model_dir, data_path, **overrides)
  train.train_and_evaluate(config, str(tmp_path / "straight"), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3,
                           devices=jax.devices()[:1])
  assert checkpoint.Checkpointer(tmp_path / "resumed", config).latest_step() == 3
  assert not (tmp_path / "resumed" / "results.json").exists()
  train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=jax.devices()[:1])

  def seen(name):
    rows = [r for r in logs.read_metrics(tmp_path / name) if "train/data_fingerprint" in r]
    return [(r["step"], r["train/data_fingerprint"]) for r in rows]
  assert [s for s, _ in seen("resumed")] == [1, 2, 3, 4, 5, 6]
  assert seen("resumed") == seen("straight")

  run = train.setup(config, jax.devices()[:1])
  state = run.initial_state
  target = checkpoint.abstract({"step": state.step, "trainable": state.trainable,
                                "opt_state": state.opt_state})
  finals = [checkpoint.Checkpointer(tmp_path / name, config).restore(6, target)[0]
            for name in ("straight", "resumed")]
  assert int(finals[0]["step"]) == int(finals[1]["step"]) == 6
  flat = [keymap.flatten(_copy(f["trainable"])) for f in finals]
  for path in flat[0]:
    np.testing.assert_allclose(flat[1][path], flat[0][path], atol=1e-6, err_msg=path)


def test_lora_checkpoint_holds_only_trainable_leaves(tiny_dirs, tmp_path):
  model_dir, data_path, _ = tiny_dirs
  overrides = {"training.num_steps": 2, "eval.every_steps": 2, "eval.splits": ("validation",),
               "optimizer.warmup_steps": 0}
  sizes = {}
  for name in ("full", "lora"):
    config = tiny.config(model_dir, data_path, **overrides, **{"strategy.name": name})
    train.train_and_evaluate(config, str(tmp_path / name), devices=jax.devices()[:1])
    files = (tmp_path / name / "checkpoints" / "2").rglob("*")
    sizes[name] = sum(f.stat().st_size for f in files if f.is_file())
    meta = checkpoint.Checkpointer(tmp_path / name, config).read_meta(2)
    assert meta["base_model"] == str(model_dir) and meta["strategy"] == name
  model_bytes = 4 * 1_016_226  # float32 parameters of the tiny model
  # Full holds every (random, incompressible) weight; orbax compresses the
  # mostly-zero Adam moments of rows no batch touched.
  assert sizes["full"] > model_bytes
  assert sizes["lora"] < 0.1 * model_bytes


def test_nan_loss_stops_with_one_clear_line(tiny_dirs, tmp_path, monkeypatch):
  model_dir, data_path, _ = tiny_dirs
  real = Classification.loss

  def nan_loss(*args, **kwargs):
    loss, sums = real(*args, **kwargs)
    return loss * float("nan"), sums

  monkeypatch.setattr(Classification, "loss", nan_loss)
  with pytest.raises(FtjaxError, match=r"loss is nan \(grad norm nan\) at step 1; "):
    train.train_and_evaluate(tiny.config(model_dir, data_path), str(tmp_path),
                             devices=jax.devices()[:1])
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_after_patience(tiny_dirs, tmp_path, patience):
  model_dir, data_path, _ = tiny_dirs
  # Validation loss rises once the learning rate is absurd.
  config = tiny.config(model_dir, data_path, **{
      "optimizer.learning_rate": 0.5, "optimizer.warmup_steps": 0, "eval.every_steps": 1,
      "eval.metric": "validation/loss", "eval.mode": "min",
      "eval.early_stopping_patience": patience, "eval.splits": ("validation",),
      "training.num_steps": 20})
  train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  evals = [r["validation/loss"] for r in logs.read_metrics(tmp_path) if "validation/loss" in r]
  assert len(evals) < 20
  # The run stopped at the first evaluation that made `patience` in a row without a new
  # best, and not before.
  best, stale, stop = math.inf, 0, None
  for i, value in enumerate(evals):
    best, stale = (value, 0) if value < best else (best, stale + 1)
    if stale == patience:
      stop = i
      break
  assert stop == len(evals) - 1, (patience, evals)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["step"] == len(evals) and results["best"]["validation/loss"] == min(evals)


def test_tracker_stops_after_exactly_patience_evaluations_without_improvement():
  values = [1.0, 0.9, 1.1, 0.8, 1.2, 1.3, 0.7]
  stops = {}
  for patience in (1, 2, 3):
    c = ml_collections.ConfigDict({"eval": {"metric": "validation/loss", "mode": "min",
                                            "early_stopping_patience": patience}})
    tracker = Tracker(c)
    for step, value in enumerate(values):
      tracker.update(step, {"validation/loss": value})
      if tracker.should_stop:
        stops[patience] = step
        break
  # patience 1: the first worse value (1.1); 2: two in a row (1.2, 1.3); 3: never.
  assert stops == {1: 2, 2: 5}
  assert tracker.best == 0.7 and tracker.best_step == 6 and tracker.stale == 0




def test_a_user_hook_runs_beside_the_default_ones(tiny_dirs, tmp_path):
  """The loop's extension point: a hook sees every step, acts when due, and always ends."""
  model_dir, data_path, _ = tiny_dirs

  class GradNormEvery2(hooks_lib.Hook):
    def __init__(self):
      self.started, self.rows, self.ended = False, [], False

    def on_start(self, loop):
      self.started = loop.step == 0

    def due(self, loop, step):
      return step % 2 == 0

    def on_step(self, loop, step, due):
      if due:  # The step's metrics are on the host by now.
        self.rows.append((step, loop.metrics["grad_norm"]))

    def on_end(self, loop):
      self.ended = True

  hook = GradNormEvery2()
  config = tiny.config(model_dir, data_path, **{"training.log_every_steps": 3,
                                                "eval.every_steps": 6})
  train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1],
                           hooks=[*hooks_lib.default_hooks(), hook])
  assert hook.started and hook.ended
  assert [s for s, _ in hook.rows] == [2, 4, 6] and all(g > 0 for _, g in hook.rows)
  # The default hooks still logged on their own cadence.
  assert [r["step"] for r in logs.read_metrics(tmp_path) if "train/loss" in r] == [3, 6]
