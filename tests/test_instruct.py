"""Instruction data: templates, the response-only loss mask, packing, mixing, and LM training.

A tiny byte-level BPE tokenizer (trained here on the shared instruction data)
and tiny random Llama / GPT-2 checkpoints keep every model call cheap.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import config as config_lib
from ftjax import models, train
from ftjax.data import batching, instruct
from ftjax.errors import ConfigError
from ftjax.objectives import CausalLM
from ftjax.peft import partition
from tests import tiny


@pytest.fixture(scope="module")
def root(tmp_path_factory, data_dir) -> pathlib.Path:
  root = tmp_path_factory.mktemp("instruct")
  tiny.make_tokenizer(root / "tok", data_dir)
  tiny.make_decoder(root / "llama", root / "tok")
  tiny.make_decoder(root / "gpt2", root / "tok", model_type="gpt2")
  tiny.make_instruct_data(root / "code", data_dir, "instruction")
  tiny.make_instruct_data(root / "math", data_dir, "multitask")
  return root


@pytest.fixture(scope="module")
def tokenizer(root):
  return models.load_tokenizer(str(root / "llama"))


def _data_config(root, **overrides) -> "config_lib.ml_collections.ConfigDict":
  c = tiny.lm_config(root / "llama", **{"data.mixture": (
      ("code", str(root / "code"), 1.0), ("math", str(root / "math"), 1.0)), **overrides})
  return c.data


# Templates.


def test_alpaca_template_with_and_without_input(root, tokenizer):
  data = _data_config(root)
  with_input = instruct.render({"instruction": "Add.", "input": "2 and 3", "output": "5"}, data,
                               tokenizer)
  assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
  assert with_input.startswith("Below is an instruction that describes a task, paired with")
  no_input = instruct.render({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, data,
                             tokenizer)
  assert "### Input:" not in no_input and no_input.endswith("Add 2 and 3.\n\n### Response:\n")
  # GSM8K-style {"input", "output"} records: the input is the instruction.
  qa = instruct.render({"input": "What is 2+3?", "output": "#### 5"}, data, tokenizer)
  assert qa.endswith("### Instruction:\nWhat is 2+3?\n\n### Response:\n")


def test_chat_template_uses_the_tokenizers_template(root, tokenizer):
  data = _data_config(root, **{"data.template": "chat"})
  text = instruct.render({"instruction": "Add.", "input": "2 and 3", "output": "5"}, data,
                         tokenizer)
  assert text == "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"


def test_split_appends_eos_and_records_the_prompt_boundary(root, tokenizer):
  data = _data_config(root)
  split = instruct.load_split(data, "test", tokenizer)
  assert split.task_names == ("code", "math")
  assert len(split) == 32 and list(np.bincount(split.task_ids)) == [16, 16]
  for i in range(len(split)):
    ids, p = split.input_ids[i], split.prompt_lengths[i]
    assert list(ids[:p]) == tokenizer(split.prompts[i])["input_ids"]
    if len(ids) < data.max_length:  # untruncated: response + EOS follow the prompt
      assert ids[-1] == tokenizer.eos_token_id
      assert list(ids[p:-1]) == tokenizer(split.references[i], add_special_tokens=False)[
          "input_ids"]


def test_long_examples_keep_the_prompt_and_lose_the_response_end(root, tokenizer):
  data = _data_config(root, **{"data.max_length": 200})
  split = instruct.load_split(data, "train", tokenizer)
  full = instruct.load_split(_data_config(root, **{"data.max_length": 2048}), "train", tokenizer)
  assert split.lengths.max() <= 200
  cut = [i for i in range(len(full)) if full.lengths[i] > 200 and full.prompt_lengths[i] < 200]
  assert cut, "the fixture should have long examples"
  by_prompt = {s: i for i, s in enumerate(split.prompts)}
  for i in cut:
    j = by_prompt[full.prompts[i]]
    assert list(split.input_ids[j]) == list(full.input_ids[i][:200])


def test_max_examples_and_a_non_string_output(root, tokenizer, tmp_path):
  split = instruct.load_split(_data_config(root), "test", tokenizer, max_examples=5)
  assert list(np.bincount(split.task_ids)) == [5, 5]
  (tmp_path / "test.jsonl").write_text('{"instruction": "a", "output": "b"}\n'
                                       '{"instruction": "c", "output": 5}\n')
  data = _data_config(root, **{"data.mixture": (("odd", str(tmp_path), 1.0),)})
  with pytest.raises(ConfigError) as e:
    instruct.load_split(data, "test", tokenizer)
  message = str(e.value)
  assert "\n" not in message and "output column 'output' of task 'odd' holds 5 (int) at " \
      "example 1; expected a string" in message, message


def test_a_split_whose_prompts_fill_max_length_is_an_error(root, tokenizer):
  with pytest.raises(ConfigError, match="data.max_length=8"):
    instruct.load_split(_data_config(root, **{"data.max_length": 8}), "test", tokenizer)


# The loss mask.


def _tiny_model(root, family="llama"):
  model, params = models.from_pretrained(str(root / family), task="causal_lm")
  return model, params


def _objective(root) -> CausalLM:
  objective = CausalLM(tiny.lm_config(root / "llama"))
  objective.task_names = ("code", "math")
  return objective


def _loss(model, params, batch, root):
  objective = _objective(root)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  loss, _ = objective.loss(model, params, {}, {}, batch, rng=None, deterministic=True,
                           normalizer=objective.normalizer(batch))
  return float(loss)


def test_loss_mask_covers_exactly_the_response_and_eos(root, tokenizer):
  split = instruct.load_split(_data_config(root), "test", tokenizer)
  batch = instruct.make_batch(split, [[0], [20]], 256, np.ones(2, np.float32))
  for row, i in enumerate((0, 20)):
    n, p = split.lengths[i], split.prompt_lengths[i]
    # Slot t predicts token t+1: weighted exactly for t+1 in [p, n).
    expected = np.zeros(256, np.float32)
    expected[p - 1:n - 1] = 1
    np.testing.assert_array_equal(batch["target_weights"][row], expected)
    np.testing.assert_array_equal(batch["targets"][row, :n - 1], split.input_ids[i][1:])


def test_prompt_labels_do_not_change_the_loss_response_labels_do(root, tokenizer):
  """The loss reads labels only at response positions.

  Replacing the prompt's label tokens (everything the model is asked to
  predict inside the prompt) leaves the loss bit-for-bit unchanged; replacing
  one response label changes it.
  """
  model, params = _tiny_model(root)
  split = instruct.load_split(_data_config(root), "test", tokenizer)
  batch = instruct.make_batch(split, [[0], [17]], 256, np.ones(2, np.float32))
  base = _loss(model, params, batch, root)
  prompt = batch["target_weights"] == 0
  rng = np.random.default_rng(0)
  changed_prompt = dict(batch, targets=np.where(
      prompt, rng.integers(3, len(tokenizer), batch["targets"].shape), batch["targets"]))
  assert (changed_prompt["targets"] != batch["targets"]).sum() > 100
  assert _loss(model, params, changed_prompt, root) == base
  response_slot = np.argwhere(batch["target_weights"] > 0)[5]
  changed_response = {k: v.copy() for k, v in batch.items()}
  changed_response["targets"][tuple(response_slot)] = (
      batch["targets"][tuple(response_slot)] + 1) % len(tokenizer)
  assert abs(_loss(model, params, changed_response, root) - base) > 1e-6


# Packing.


def _per_example_losses(model, params, batch) -> dict[int, float]:
  """Response-token loss sum of each segment, keyed by (row, segment)."""
  logits = model.apply(params, jnp.asarray(batch["input_ids"]),
                       segment_ids_bt=jnp.asarray(batch["segment_ids"]),
                       positions_bt=jnp.asarray(batch["positions"])).logits
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.asarray(batch["targets"]))) * batch["target_weights"]
  out = {}
  for r in range(ce.shape[0]):
    for s in range(1, batch["segment_ids"][r].max() + 1):
      out[(r, s)] = float(ce[r][batch["segment_ids"][r] == s].sum())
  return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_rows_give_the_unpacked_per_example_losses(root, tokenizer, family):
  model, params = _tiny_model(root, family)
  split = instruct.load_split(_data_config(root), "test", tokenizer)
  rows = batching.pack(np.arange(len(split)), split.lengths, 1024)
  assert max(len(r) for r in rows) >= 3, "the test needs rows holding several examples"
  packed = _per_example_losses(model, params, instruct.make_batch(
      split, rows, 1024, np.ones(len(rows), np.float32)))
  alone = _per_example_losses(model, params, instruct.make_batch(
      split, [[i] for i in range(len(split))], 512, np.ones(len(split), np.float32)))
  for r, row in enumerate(rows):
    for s, i in enumerate(row, start=1):
      assert packed[(r, s)] == pytest.approx(alone[(i, 1)], abs=1e-5, rel=1e-6)
      assert alone[(i, 1)] > 0


def test_pack_places_every_example_once_within_the_row_length():
  lengths = np.random.default_rng(0).integers(5, 120, 300)
  rows = batching.pack(np.arange(300), lengths, 128)
  assert sorted(i for row in rows for i in row) == list(range(300))
  assert all(lengths[row].sum() <= 128 for row in rows)
  # First fit fills rows well: fewer rows than one per example, near the bound.
  assert len(rows) < 1.2 * np.ceil(lengths.sum() / 128)


# Mixing.


def test_mixture_samples_tasks_by_weight_and_is_deterministic(root, tokenizer):
  data = _data_config(root, **{"data.mixture": (("code", str(root / "code"), 1.0),
                                                ("math", str(root / "math"), 3.0))})
  split = instruct.load_split(data, "train", tokenizer)
  plan = instruct.train_plan(split, data, global_batch_size=4, buckets=(256,), seed=0)
  again = instruct.train_plan(split, data, global_batch_size=4, buckets=(256,), seed=0)
  tasks = []
  for step in range(3 * plan.steps_per_epoch):
    batch = plan(step)
    np.testing.assert_array_equal(batch["input_ids"], again(step)["input_ids"])
    firsts = batch["positions"] == 0
    tasks += list(batch["task_ids"][firsts & (batch["segment_ids"] > 0)])
  share = np.mean(np.asarray(tasks) == 1)
  assert share == pytest.approx(0.75, abs=0.03)
  other_seed = instruct.train_plan(split, data, global_batch_size=4, buckets=(256,), seed=1)
  assert not np.array_equal(other_seed(0)["input_ids"], plan(0)["input_ids"])


def _synthetic_mixture(num_tasks: int, per_task: int, max_length: int = 64):
  """A split of `num_tasks` tasks of `per_task` random examples, and its data config."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(4, max_length + 1, num_tasks * per_task)
  names = tuple(f"task{t}" for t in range(num_tasks))
  split = instruct.InstructSplit(
      [rng.integers(3, 100, n).astype(np.int32) for n in lengths],
      np.minimum(lengths - 1, 3).astype(np.int32),
      np.repeat(np.arange(num_tasks), per_task).astype(np.int32), names,
      [""] * len(lengths), [""] * len(lengths))
  data = config_lib.default_config().data
  data.max_length = max_length
  data.mixture = tuple((name, f"/unused/{name}", 1.0) for name in names)
  return split, data


def test_each_task_stream_shuffles_once_per_epoch_however_many_tasks(monkeypatch):
  """Six task streams: each (task, epoch) permutation is computed once, not once per draw.

  A stream reshuffles with `default_rng([seed, task, epoch])`; counting those
  calls counts the permutations (a cache shared by the streams and smaller than
  the number of tasks recomputed one on almost every draw).
  """
  split, data = _synthetic_mixture(num_tasks=6, per_task=20)
  seeds = []
  default_rng = np.random.default_rng

  def counting_rng(seed=None):
    seeds.append(tuple(np.atleast_1d(seed).tolist()) if seed is not None else ())
    return default_rng(seed)

  plan = instruct.train_plan(split, data, global_batch_size=4, buckets=(64,), seed=0)
  expected = [plan(step)["input_ids"] for step in range(3 * plan.steps_per_epoch)]
  monkeypatch.setattr(np.random, "default_rng", counting_rng)
  counted = instruct.train_plan(split, data, global_batch_size=4, buckets=(64,), seed=0)
  for step, input_ids in enumerate(expected):  # the data order is the same, counted or not
    np.testing.assert_array_equal(counted(step)["input_ids"], input_ids)
  permutations = [s for s in seeds if len(s) == 3]  # (seed, task, epoch)
  touched = set(permutations)
  epochs = max(epoch for _, _, epoch in touched) + 1
  assert {task for _, task, _ in touched} == set(range(6)) and epochs >= 3
  assert len(permutations) == len(touched) <= 6 * epochs, len(permutations)


def test_each_process_materialises_its_own_rows(root, tokenizer):
  data = _data_config(root, **{"data.packing": True})
  split = instruct.load_split(data, "train", tokenizer)
  whole = instruct.train_plan(split, data, global_batch_size=4, buckets=(256,), seed=0)
  halves = [instruct.train_plan(split, data, global_batch_size=4, buckets=(256,), seed=0,
                                process_index=p, process_count=2) for p in range(2)]
  for step in range(3):
    joined = np.concatenate([h(step)["input_ids"] for h in halves])
    np.testing.assert_array_equal(joined, whole(step)["input_ids"])


# Training.


@pytest.fixture(scope="module")
def lm_run(root, tmp_path_factory):
  """A LoRA run on the 2-task mixture with packing and generation-based evaluation."""
  workdir = tmp_path_factory.mktemp("lm_run")
  config = tiny.lm_config(root / "llama", **{
      "data.mixture": (("code", str(root / "code"), 1.0), ("math", str(root / "math"), 1.0)),
      "data.packing": True, "strategy.name": "lora", "strategy.lora.targets": ("all-linear",),
      "eval.generate_examples": 3, "eval.max_new_tokens": 8, "eval.at_start": True,
      "training.num_steps": 6, "eval.every_steps": 3})
  results = train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return config, workdir, results, rows


def test_lm_run_logs_per_task_metrics_and_perplexity(lm_run):
  _, _, results, rows = lm_run
  train_rows = [r for r in rows if "train/loss" in r]
  assert len(train_rows) == 6
  for row in train_rows:
    assert {"train/code/loss", "train/math/loss", "train/code/tokens"} <= set(row)
  evals = [r for r in rows if "test/perplexity" in r]
  assert [r["step"] for r in evals] == [0, 3, 6]  # eval.at_start, then every 3 steps
  for key in ("test/perplexity", "test/code/perplexity", "test/math/perplexity"):
    assert results[key] > 1
  assert results["test/perplexity"] == pytest.approx(np.exp(results["test/loss"]))
  # 3 generated answers per task: the overall exact match is the mean of the two tasks'.
  per_task = [results["test/code/exact_match"], results["test/math/exact_match"]]
  assert all(round(3 * v) == pytest.approx(3 * v) for v in per_task)
  assert results["test/exact_match"] == pytest.approx(np.mean(per_task))
  # Training moves the held-out loss (a random model with lr 3e-3).
  assert evals[-1]["test/loss"] < evals[0]["test/loss"]


def test_lm_run_writes_samples(lm_run):
  _, workdir, _, _ = lm_run
  samples = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
  assert len(samples) == 3 * 4  # 3 evaluations x eval.num_samples
  assert {s["task"] for s in samples} == {"code", "math"}
  for s in samples:
    assert s["prompt"].endswith("### Response:\n") and isinstance(s["prediction"], str)
    assert set(s) == {"step", "split", "task", "prompt", "reference", "prediction",
                      "exact_match"}


def test_lm_run_resumes_exactly(lm_run, tmp_path):
  config, _, results, rows = lm_run
  config = config_lib.override(config.copy_and_resolve_references(), {"eval.generate_examples": 0})
  train.train_and_evaluate(config, str(tmp_path), stop_at_step=4)
  resumed = train.train_and_evaluate(config, str(tmp_path))
  again = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  fingerprints = lambda rs: [(r["step"], r["train/data_fingerprint"], r["train/loss"])
                             for r in rs if "train/loss" in r]
  assert fingerprints(again) == fingerprints(rows)
  assert resumed["test/loss"] == results["test/loss"]


def test_accumulation_without_dropout_changes_nothing_but_memory(root, tokenizer):
  """The tiny Llama has no dropout: 4 micro-batches give the one-batch step. (With dropout,
  each micro-batch draws its own masks, so only the distribution is the same.)"""
  model, params = _tiny_model(root)
  labels = partition.labels(list(model.param_axes), [(".*", partition.TRAINABLE)])
  trainable, frozen = partition.split(params, labels)
  split = instruct.load_split(_data_config(root), "test", tokenizer)
  batch = {k: jnp.asarray(v) for k, v in instruct.make_batch(
      split, [[i] for i in range(8)], 256, np.ones(8, np.float32)).items()}
  grads = []
  for accumulation in (1, 4):
    step = train.make_train_step(_objective(root), model, optax.sgd(1.0),
                                 optax.constant_schedule(1.0), accumulation_steps=accumulation)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                             opt_state=optax.sgd(1.0).init(trainable))
    new_state, metrics = jax.jit(step)(state, {}, batch, jax.random.key(0))
    grads.append((float(metrics["loss"]), new_state.trainable))
  assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(grads[0][1]), jax.tree.leaves(grads[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_lm_config_errors_name_the_key(root):
  with pytest.raises(ConfigError, match="'data.packing'"):
    tiny.config(root / "llama", root / "code", **{"data.packing": True})
  with pytest.raises(ConfigError, match="'data.mixture'"):
    tiny.lm_config(root / "llama", **{"data.mixture": (("a", str(root / "code"), 0.0),)})
  with pytest.raises(ConfigError, match="'data.path'"):
    tiny.lm_config(root / "llama", root / "code",
                   **{"data.mixture": (("a", str(root / "code"), 1.0),)})
  with pytest.raises(ConfigError, match="'eval.metric'"):
    tiny.lm_config(root / "llama", root / "code", **{"eval.metric": "test/f1"})


def test_export_merged_and_peft_from_a_lora_run(lm_run, tmp_path):
  """`ftjax.export`: the merged checkpoint and the PEFT adapter both reproduce the run's model."""
  import peft  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from ftjax import export  # pylint: disable=g-import-not-at-top
  config, workdir, _, _ = lm_run
  _, model, params, tokenizer, step, saved = export.restore_params(workdir)
  assert step == 6 and all(p.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for p in saved)
  ids = np.asarray([tokenizer("### Instruction:\nAdd 2 and 3.\n\n### Response:\n")["input_ids"]])
  ours = np.asarray(model.apply(params, ids).logits)
  export.export(workdir, tmp_path / "merged")
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                             dtype=torch.float32).eval()
  with torch.no_grad():
    np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
  assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")("hi")["input_ids"] == \
      tokenizer("hi")["input_ids"]
  export.export(workdir, tmp_path / "adapter", fmt="peft")
  base = transformers.AutoModelForCausalLM.from_pretrained(config.model.name_or_path,
                                                           dtype=torch.float32)
  adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(adapted(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
  bad = subprocess.run([sys.executable, "-m", "ftjax.export", f"--workdir={workdir}",
                        f"--out={tmp_path / 'x'}", "--checkpoint=5"], capture_output=True,
                       text=True, check=False)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == (
      "ftjax: error: checkpoints '5': no checkpoint at step 5; the workdir has steps [3, 6]")
  assert not (tmp_path / "x").exists()
