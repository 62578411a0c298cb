"""Distillation (`ftjax.objectives.distill`): losses, the frozen teacher, the projection,
the teacher cache, students cut from the teacher, decoders, and the config errors.

Tiny BERTs share MiniLM's tokenizer; tiny Llamas share a small BPE tokenizer.
The teacher is a finished tiny run (a workdir), which also exercises loading a
run as a model.
"""

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from ftjax import checkpoint as checkpoint_lib
from ftjax import config as config_lib
from ftjax import export, optim, train
from ftjax.core import compiled
from ftjax.core import run as run_lib
from ftjax.errors import ConfigError
from ftjax.models import keymap
from ftjax.objectives import distill
from ftjax.peft import partition
from tests import tiny

DEVICES = 1


@dataclasses.dataclass(frozen=True)
class Assets:
  data: pathlib.Path
  teacher: pathlib.Path        # a finished 4-layer run (workdir), hidden 32
  wide_teacher: pathlib.Path   # a finished 2-layer run, hidden 48
  student: pathlib.Path        # a random 2-layer BERT folder, hidden 32


def _bert_config(model, data, **overrides):
  base = {"training.num_steps": 4, "eval.every_steps": 4, "eval.splits": ("validation",),
          "data.num_buckets": 1, "training.batch_size": 8, "optimizer.warmup_steps": 0}
  return tiny.config(model, data, **{**base, **overrides})


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm_dir, data_dir) -> Assets:
  root = tmp_path_factory.mktemp("distill")
  data = tiny.make_data(root / "data", data_dir, sizes=(("train", 64), ("validation", 32)))
  teacher_model = tiny.make_model(root / "teacher_model", minilm_dir, dropout=0.0)
  wide_model = tiny.make_model(root / "wide_model", minilm_dir, dropout=0.0, num_layers=2,
                               hidden_size=48)
  student = tiny.make_model(root / "student", minilm_dir, dropout=0.0, num_layers=2)
  devices = jax.devices()[:DEVICES]
  train.train_and_evaluate(_bert_config(teacher_model, data), str(root / "teacher"),
                           devices=devices)
  train.train_and_evaluate(_bert_config(wide_model, data), str(root / "wide_teacher"),
                           devices=devices)
  return Assets(data, root / "teacher", root / "wide_teacher", student)


def _distill_config(assets, model=None, **overrides):
  c = _bert_config(model or assets.teacher, assets.data)
  c.objective.name = "distill"
  c.objective.teacher = str(assets.teacher)
  config_lib.override(c, overrides)
  return config_lib.validate(c)


def _batch(run):
  return run.device_batch(run.config.data.train_split, next(iter(run.data.train_iterator(1))))


def _loss_and_grads(run, batch, alpha_one_objective=None):
  objective = alpha_one_objective or run.objective
  state = run.initial_state

  def loss_fn(trainable):
    params, objective_params = run_lib.state_lib.split_objective(trainable)
    params = partition.merge(params, state.frozen)
    return objective.loss(run.model, params, objective_params, run.refs, batch, rng=None,
                          deterministic=True, normalizer=objective.normalizer(batch))

  (loss, sums), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.trainable)
  return loss, sums, grads


def test_forward_kl_at_t1_equals_a_hand_computed_value():
  teacher, student = np.array([[1.0, 2.0, 3.0]]), np.array([[3.0, 2.0, 1.0]])
  p = np.exp(teacher) / np.exp(teacher).sum()
  q = np.exp(student) / np.exp(student).sum()
  # p = (0.0900, 0.2447, 0.6652): KL(p||q) = sum p log(p/q) = 2 * (0.6652 - 0.0900) = 1.1504
  assert math.isclose((p * np.log(p / q)).sum(), 2 * (p[0, 2] - p[0, 0]), rel_tol=1e-6)
  got = distill.divergence(jnp.asarray(student), jnp.asarray(teacher), "forward_kl", 0.5)
  np.testing.assert_allclose(np.asarray(got), [1.1504], atol=1e-4)
  reverse = distill.divergence(jnp.asarray(student), jnp.asarray(teacher), "reverse_kl", 0.5)
  np.testing.assert_allclose(np.asarray(reverse), [(q * np.log(q / p)).sum()], rtol=1e-5)
  beta = 0.3
  m = beta * p + (1 - beta) * q
  jsd = beta * (p * np.log(p / m)).sum() + (1 - beta) * (q * np.log(q / m)).sum()
  got = distill.divergence(jnp.asarray(student), jnp.asarray(teacher), "jsd", beta)
  np.testing.assert_allclose(np.asarray(got), [jsd], rtol=1e-5)


def test_top_k_over_the_whole_vocabulary_is_the_full_divergence():
  rng = np.random.default_rng(0)
  student, teacher = (jnp.asarray(rng.normal(size=(3, 5, 11)), jnp.float32) for _ in range(2))
  for kind in distill.DIVERGENCES:
    full = distill.divergence(student, teacher, kind, 0.4)
    whole = distill.topk_divergence(student, *distill.teacher_summary(teacher, 11), kind, 0.4)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(full), rtol=1e-5, atol=1e-6)
    # k < V: k + 1 outcomes, a coarser distribution: never more divergent (data processing).
    coarse = distill.topk_divergence(student, *distill.teacher_summary(teacher, 3), kind, 0.4)
    assert np.all(np.asarray(coarse) <= np.asarray(full) + 1e-6)
    assert np.all(np.asarray(coarse) >= -1e-6)


def test_student_equal_to_teacher_has_zero_loss_and_zero_gradients(assets):
  run = run_lib.setup(_distill_config(assets, **{"objective.alpha": 0.0,
                                                 "objective.temperature": 3.0}),
                      jax.devices()[:DEVICES])
  loss, sums, grads = _loss_and_grads(run, _batch(run))
  assert abs(float(loss)) < 1e-6 and abs(float(sums["kd_sum"])) < 1e-5
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-6


def test_alpha_1_is_the_base_objective(assets):
  config = _distill_config(assets, model=assets.student, **{"objective.alpha": 1.0})
  run = run_lib.setup(config, jax.devices()[:DEVICES])
  batch = _batch(run)
  loss, _, grads = _loss_and_grads(run, batch)
  base_loss, _, base_grads = _loss_and_grads(run, batch, run.objective.base)
  assert float(loss) == float(base_loss)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # With alpha < 1 the teacher changes the loss.
  soft = run_lib.setup(_distill_config(assets, model=assets.student,
                                       **{"objective.alpha": 0.5}), jax.devices()[:DEVICES])
  assert float(_loss_and_grads(soft, batch)[0]) != float(loss)


def _trainable(workdir):
  step = checkpoint_lib.find(workdir)[1]
  return checkpoint_lib.read_trainable(pathlib.Path(workdir), step)


def test_teacher_is_frozen_unsaved_and_has_no_optimizer_state(assets):
  config = _distill_config(assets, model=assets.student, **{"objective.hidden_weight": 1.0})
  run = run_lib.setup(config, jax.devices()[:DEVICES])
  teacher_before = jax.tree.map(np.array, run.refs["teacher"])
  train_step, _ = compiled.compile_steps(run)
  state, rng = run.initial_state, jax.random.key(0)
  iterator = run.data.train_iterator(3)
  for _ in range(3):
    state, metrics = train_step(state, run.device_batch("train", next(iterator)), rng)
  assert float(metrics["kd_loss"]) > 0 and float(metrics["hidden_loss"]) > 0
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(run.refs["teacher"])):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Adam's two moments of the student's trainable parameters, and nothing of the teacher's.
  trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(state.trainable))
  teacher_bytes = sum(x.nbytes for x in jax.tree.leaves(run.refs["teacher"]))
  assert teacher_bytes > trainable_bytes / 2
  assert 2 * trainable_bytes <= optim.state_bytes(state.opt_state) <= 2 * trainable_bytes + 64
  assert "teacher" not in json.dumps(list(keymap.flatten(state.trainable)))


def test_student_cut_from_the_teacher_run_exports_to_pytorch(assets, tmp_path):
  """model.name_or_path = the teacher's workdir, model.layers = (0, 2): DistilBERT's start."""
  config = _distill_config(assets, **{"model.layers": (0, 2), "training.num_steps": 2,
                                      "eval.every_steps": 2})
  run = run_lib.setup(config, jax.devices()[:DEVICES])
  teacher = _trainable(assets.teacher)
  student = keymap.flatten(run.model_params(run.initial_state))
  assert run.model.config.num_layers == 2
  np.testing.assert_array_equal(student["encoder/layers/1/attention/query/kernel"],
                                teacher["encoder/layers/2/attention/query/kernel"])
  np.testing.assert_array_equal(student["classifier/out/kernel"], teacher["classifier/out/kernel"])
  train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:DEVICES])
  out = export.export(tmp_path / "run", tmp_path / "export")
  _, model, params, tokenizer, _, _ = export.restore_params(tmp_path / "run")
  texts = ["a gripping, beautifully made film", "dull"]
  enc = tokenizer(texts, padding=True, return_tensors="np")
  ours = model.apply(params, enc["input_ids"], enc["attention_mask"],
                     token_type_ids=enc["token_type_ids"]).logits
  pt = transformers.BertForSequenceClassification.from_pretrained(out).eval()
  assert pt.config.num_hidden_layers == 2
  with torch.no_grad():
    theirs = pt(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5)


def test_cached_teacher_trains_like_the_online_teacher(assets, tmp_path):
  overrides = {"objective.temperature": 2.0, "training.num_steps": 4}
  online = _distill_config(assets, model=assets.student, **overrides)
  cached = _distill_config(assets, model=assets.student, **{**overrides,
                                                             "objective.cache_teacher": True})
  devices = jax.devices()[:DEVICES]
  train.train_and_evaluate(online, str(tmp_path / "online"), devices=devices)
  second = train.train_and_evaluate(cached, str(tmp_path / "cached"), devices=devices)
  assert len(list((tmp_path / "cached" / "feature_cache").glob("teacher-*.npz"))) == 1
  a, b = _trainable(tmp_path / "online"), _trainable(tmp_path / "cached")
  for path in a:
    np.testing.assert_allclose(a[path], b[path], atol=1e-6, err_msg=path)
  # The evaluator restores the student and evaluates it as training did (no teacher pass).
  from ftjax import evaluate  # pylint: disable=import-outside-toplevel
  row, = evaluate.run_evaluator(str(tmp_path / "cached"), split="validation",
                                devices=jax.devices()[:DEVICES])
  assert math.isclose(row["validation/accuracy"], second["validation/accuracy"])
  assert math.isclose(row["validation/loss"], second["validation/loss"], rel_tol=1e-5)
  assert len(list((tmp_path / "cached" / "feature_cache").glob("teacher-*.npz"))) == 1


def test_resuming_with_another_teacher_is_refused(assets, tmp_path):
  config = _distill_config(assets, model=assets.student, **{"training.num_steps": 2,
                                                           "eval.every_steps": 2})
  train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:DEVICES],
                           stop_at_step=1)
  other = _distill_config(assets, model=assets.student, **{
      "training.num_steps": 2, "eval.every_steps": 2,
      "objective.teacher": str(assets.wide_teacher)})
  with pytest.raises(Exception, match="holds a checkpoint of another run"):
    train.train_and_evaluate(other, str(tmp_path / "run"), devices=jax.devices()[:DEVICES])


@pytest.mark.parametrize("overrides, message", [
    ({"objective.temperature": 0.0}, "'objective.temperature' is 0.0; expected a temperature > 0"),
    ({"objective.alpha": 1.5}, "'objective.alpha' is 1.5; expected a weight in [0, 1]"),
    ({"objective.divergence": "kl"}, "'objective.divergence' is 'kl'"),
    ({"objective.divergence": "jsd", "objective.beta": 0.0}, "'objective.beta' is 0.0"),
    ({"objective.teacher": ""}, "'objective.teacher' is ''"),
    ({"objective.top_k": 5}, "'objective.top_k' is 5; expected 0 for classification"),
    ({"objective.cache_teacher": True, "objective.hidden_weight": 1.0},
     "'objective.hidden_weight' is 1.0"),
    ({"objective.base": "distill"}, "'objective.base' is 'distill'"),
    ({"model.layers": (2, 0)}, "'model.layers' is (2, 0)"),
])
def test_config_errors_name_the_key(assets, overrides, message):
  with pytest.raises(ConfigError) as error:
    _distill_config(assets, **overrides)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_layers_out_of_range_and_other_vocabularies_are_one_line(assets, tmp_path, data_dir):
  with pytest.raises(ConfigError, match=r"'model.layers' is \(0, 4\); expected increasing layer "
                     r"indices in \[0, 4\)"):
    run_lib.setup(_distill_config(assets, **{"model.layers": (0, 4)}), jax.devices()[:DEVICES])
  tiny.make_tokenizer(tmp_path / "tokenizer", data_dir)
  llama = tiny.make_decoder(tmp_path / "llama", tmp_path / "tokenizer")
  with pytest.raises(ConfigError) as error:
    run_lib.setup(_distill_config(assets, model=assets.student,
                                  **{"objective.teacher": str(llama)}), jax.devices()[:DEVICES])
  line = str(error.value)
  assert "\n" not in line and "llama, 2048-token vocabulary" in line, line
  assert "bert, 30522-token vocabulary" in line and "different tokenizers" in line, line


# ------------------------------------------------------------------ decoders


@pytest.fixture(scope="module")
def lm_assets(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("distill_lm")
  tiny.make_tokenizer(root / "tokenizer", data_dir, vocab_size=512)
  teacher = tiny.make_decoder(root / "teacher", root / "tokenizer", num_layers=2, seed=1)
  data = tiny.make_instruct_data(root / "data", data_dir, "instruction",
                                 sizes=(("train", 24), ("test", 8)))
  return teacher, data


def _lm_distill_config(teacher, data, **overrides):
  c = tiny.lm_config(teacher, data, **{"model.layers": (1,), "data.packing": True,
                                       "data.max_length": 256, "training.num_steps": 3,
                                       "eval.max_examples": 8})
  c.objective.name = "distill"
  c.objective.teacher = str(teacher)
  c.objective.alpha = 0.2
  config_lib.override(c, overrides)
  return config_lib.validate(c)


@pytest.mark.parametrize("top_k", [0, 8])
def test_decoder_cached_top_k_trains_like_online(lm_assets, tmp_path, top_k):
  """Packed rows look their tokens' teacher outputs up by example and position; with
  top_k = 0 the whole vocabulary is cached and the loss is the online one."""
  teacher, data = lm_assets
  devices = jax.devices()[:DEVICES]
  online = _lm_distill_config(teacher, data, **{"objective.top_k": top_k})
  cached = _lm_distill_config(teacher, data, **{"objective.top_k": top_k,
                                                "objective.cache_teacher": True})
  first = train.train_and_evaluate(online, str(tmp_path / "online"), devices=devices)
  second = train.train_and_evaluate(cached, str(tmp_path / "cached"), devices=devices)
  cache = np.load(next((tmp_path / "cached" / "feature_cache").glob("teacher-*.npz")))
  assert cache["values"].shape[1] == (top_k or 512)
  assert np.isfinite(first["test/perplexity"]) and np.isfinite(second["test/perplexity"])
  a, b = _trainable(tmp_path / "online"), _trainable(tmp_path / "cached")
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_allclose(a[path], b[path], atol=2e-6, err_msg=path)
  rows = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text()
          .splitlines()]
  assert all(r["train/kd_loss"] > 0 for r in rows if "train/kd_loss" in r)


def test_decoder_student_from_every_other_layer_in_bfloat16_teacher(lm_assets, tmp_path):
  teacher, data = lm_assets
  config = _lm_distill_config(teacher, data, **{
      "model.layers": (0,), "objective.teacher_dtype": "bfloat16",
      "objective.divergence": "jsd", "objective.beta": 0.5, "objective.hidden_weight": 0.5,
      "objective.hidden_loss": "cosine"})
  run = run_lib.setup(config, jax.devices()[:DEVICES])
  assert {x.dtype for x in jax.tree.leaves(run.refs["teacher"])} == {jnp.dtype(jnp.bfloat16)}
  assert run.model.config.num_layers == 1 and run.objective.hidden_pairs(run.model) == ((1, 2),)
  results = train.train_and_evaluate(config, str(tmp_path / "run"),
                                     devices=jax.devices()[:DEVICES])
  assert np.isfinite(results["test/loss"])


def test_sequence_level_distillation_writes_the_teachers_greedy_answers(lm_assets, tmp_path):
  from ftjax import distill_data, generate as generate_lib, models  # pylint: disable=import-outside-toplevel
  from ftjax.data import instruct  # pylint: disable=import-outside-toplevel
  teacher, data = lm_assets
  config = _lm_distill_config(teacher, data, **{"eval.batch_size": 2, "data.packing": False})
  mixture = distill_data.distill_data(config, tmp_path / "seqkd", max_new_tokens=6,
                                      max_examples=5)
  (name, folder, weight), = mixture
  assert weight == 1.0 and pathlib.Path(folder) == tmp_path / "seqkd" / name
  records = [json.loads(line) for line in (pathlib.Path(folder) / "train.jsonl").read_text()
             .splitlines()]
  originals = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:5]]
  assert [r["instruction"] for r in records] == [r["instruction"] for r in originals]
  # Each answer is the teacher's greedy continuation of that prompt alone (no batch padding).
  model, params = models.from_pretrained(str(teacher), task="causal_lm")
  tokenizer = models.load_tokenizer(str(teacher))
  for record, original in zip(records, originals):
    prompt = tokenizer(instruct.render(original, config.data, tokenizer))["input_ids"]
    alone = generate_lib.generate(model, params, [prompt], max_new_tokens=6,
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    assert record["output"] == tokenizer.decode(alone.tokens[0], skip_special_tokens=True)
  assert (pathlib.Path(folder) / "test.jsonl").resolve() == (data / "test.jsonl").resolve()
  student = tiny.lm_config(teacher, pathlib.Path(folder), **{"training.num_steps": 2,
                                                              "training.batch_size": 4,
                                                              "eval.max_examples": 4})
  results = train.train_and_evaluate(student, str(tmp_path / "student"),
                                     devices=jax.devices()[:DEVICES])
  assert np.isfinite(results["test/loss"])


def test_teacher_is_sharded_like_the_student_and_computes_like_one_device(assets):
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  overrides = {"objective.hidden_weight": 1.0, "training.num_steps": 2, "eval.every_steps": 2}
  config = _distill_config(assets, model=assets.student, **overrides, **mesh)
  run = run_lib.setup(config, jax.devices()[:8])
  student = keymap.flatten(run.initial_state.trainable)
  teacher = keymap.flatten(run.refs["teacher"])
  path = "encoder/layers/0/attention/query/kernel"
  assert teacher[path].sharding.spec == student[path].sharding.spec
  assert len(teacher[path].sharding.device_set) == 8
  single = run_lib.setup(_distill_config(assets, model=assets.student, **overrides),
                         jax.devices()[:1])
  # The same batch's loss (KD + hidden states) and gradients on 8 devices and on one.
  loss, sums, grads = _loss_and_grads(run, _batch(run))
  loss_1, sums_1, grads_1 = _loss_and_grads(single, _batch(single))
  assert float(sums["kd_sum"]) > 0 and float(sums["hidden_sum"]) > 0
  assert math.isclose(float(loss), float(loss_1), rel_tol=1e-5)
  for g, g_1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_1), atol=1e-5)


def test_projection_survives_kill_9_bitwise(assets, tmp_path):
  """The real entry point, killed (SIGKILL) mid-run and started again, ends with the same
  student and projection as a run never killed."""
  import os  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from tests.conftest import REPO  # pylint: disable=import-outside-toplevel

  def command(workdir):
    flags = {"model.name_or_path": assets.student, "model.layers": "()",
             "objective.teacher": assets.wide_teacher, "objective.hidden_weight": 1.0,
             "objective.cache_teacher": False, "data.path": assets.data,
             "data.num_buckets": 1, "training.num_steps": 8, "training.batch_size": 8,
             "training.log_every_steps": 1, "checkpoint.every_steps": 1,
             "eval.every_steps": 8, "eval.splits": "validation",
             "eval.metric": "validation/accuracy"}
    return [sys.executable, "-m", "ftjax.main", "--config=configs/distill_minilm.py",
            f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in flags.items())]

  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  whole = subprocess.run(command(tmp_path / "whole"), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
  assert whole.returncode == 0, whole.stderr[-3000:]
  with open(tmp_path / "log.txt", "w", encoding="utf-8") as log:
    process = subprocess.Popen(command(tmp_path / "killed"), cwd=REPO, env=env,  # pylint: disable=consider-using-with
                               stdout=log, stderr=subprocess.STDOUT)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
      if checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= 3
                                      for p in checkpoints.iterdir()):
        break
      time.sleep(0.05)
    assert process.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
  again = subprocess.run(command(tmp_path / "killed"), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resumed from" in again.stderr
  a, b = _trainable(tmp_path / "whole"), _trainable(tmp_path / "killed")
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  # A 32-wide student learned from a 48-wide teacher through one projection per layer.
  assert sorted(p for p in a if p.startswith("objective/")) == [
      "objective/projection/1/bias", "objective/projection/1/kernel",
      "objective/projection/2/bias", "objective/projection/2/kernel"]
  assert a["objective/projection/1/kernel"].shape == (32, 48)
  run = run_lib.setup(_distill_config(assets, model=assets.student, **{
      "objective.teacher": str(assets.wide_teacher), "objective.hidden_weight": 1.0}),
                      jax.devices()[:DEVICES])
  initial = run.initial_state.trainable["objective"]["projection"]["1"]["kernel"]
  assert initial.shape == (32, 48) and not np.allclose(np.asarray(initial),
                                                       a["objective/projection/1/kernel"])
  # ... and the projection is the objective's, never the model's: not exported.
  out = export.export(tmp_path / "whole", tmp_path / "export")
  assert not any("projection" in name for name in load_file(out / "model.safetensors"))
  assert transformers.BertForSequenceClassification.from_pretrained(out).config.hidden_size == 32
