"""The input pipeline: sources, tokenisation, bucketing, deterministic and resumable batches."""

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax import models
from ftjax.data import batching, pipeline, sources
from ftjax.errors import ConfigError
from tests.conftest import REPO

# The data keys these tests rely on, pinned so a change of schema defaults does not move them.
_DATA_KEYS = dict(source="files", name="", path="", text_column="text", text_pair_column="",
                  label_column="label", max_length=64, bucket_lengths=(), num_buckets=4)


def data_config(**overrides):
  c = config_lib.default_config().data
  for key, value in {**_DATA_KEYS, **overrides}.items():
    c[key] = value
  return c


def assert_one_line(error, *expected):
  message = str(error.value)
  assert "\n" not in message, message
  for text in expected:
    assert text in message, message


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return models.load_tokenizer(str(minilm_dir))


@pytest.fixture(scope="module")
def rt_dir(data_dir):
  return data_dir / "rotten_tomatoes"


@pytest.fixture(scope="module")
def rt_train(rt_dir, tokenizer):
  """The first 2000 rotten_tomatoes training sentences, max_length 64."""
  config = data_config(path=str(rt_dir))
  dataset = sources.load_split(config, "train").select(range(2000))
  return pipeline.tokenize_split(dataset, config, tokenizer, num_labels=2)


def synthetic_split(num_examples=1000, max_length=64, seed=0):
  """Example i has label i and tokens [i, i, ...]: batches reveal which examples they hold."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, max_length + 1, num_examples)
  input_ids = [np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)]
  return pipeline.TokenizedSplit(input_ids, None, np.arange(num_examples, dtype=np.int32))


BUCKETS = (16, 32, 48, 64)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------- tokenisation


def test_tokenize_truncates_like_the_tokenizer_and_logs_the_count(rt_dir, tokenizer, caplog):
  config = data_config(path=str(rt_dir), max_length=16)
  dataset = sources.load_split(config, "validation").select(range(300))
  with caplog.at_level("INFO"):
    split = pipeline.tokenize_split(dataset, config, tokenizer, num_labels=2)
  expected = tokenizer(list(dataset["text"]), truncation=True, max_length=16)["input_ids"]
  assert [ids.tolist() for ids in split.input_ids] == expected
  assert split.input_ids[0].dtype == np.int32 and split.labels.dtype == np.int32
  assert split.token_type_ids is None and len(split) == 300
  full_lengths = [len(ids) for ids in tokenizer(list(dataset["text"]))["input_ids"]]
  num_truncated = sum(n > 16 for n in full_lengths)
  assert 0 < num_truncated < 300
  assert f"{num_truncated} (" in caplog.text and "max_length=16" in caplog.text
  assert split.lengths.max() == 16


def test_sentence_pairs_get_token_type_ids(tokenizer):
  dataset = datasets.Dataset.from_dict({"a": ["a good film", "bad"], "b": ["yes", "no it is not"],
                                        "label": [1, 0]})
  config = data_config(text_column="a", text_pair_column="b", max_length=8)
  split = pipeline.tokenize_split(dataset, config, tokenizer, num_labels=2)
  expected = tokenizer(["a good film", "bad"], ["yes", "no it is not"], truncation=True,
                       max_length=8)
  assert [t.tolist() for t in split.token_type_ids] == expected["token_type_ids"]
  assert split.token_type_ids[0].max() == 1
  batch = next(pipeline.eval_batches(split, global_batch_size=2, buckets=(8,)))
  np.testing.assert_array_equal(batch["token_type_ids"][1, :split.lengths[1]],
                                split.token_type_ids[1])


def test_label_out_of_range_names_value_and_index(tokenizer):
  dataset = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 2, 1]})
  with pytest.raises(ConfigError) as e:
    pipeline.tokenize_split(dataset, data_config(), tokenizer, num_labels=2)
  assert_one_line(e, "label 2 of example 1", "[0, 2)")


def test_string_labels_are_refused(tokenizer):
  dataset = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["pos", "neg"]})
  with pytest.raises(ConfigError) as e:
    pipeline.tokenize_split(dataset, data_config(), tokenizer, num_labels=2)
  assert_one_line(e, "'label'", "'pos'", "integer class ids")


# ---------------------------------------------------------------- buckets


def test_bucket_lengths_from_quantiles_and_explicit():
  lengths = np.arange(1, 101)
  assert pipeline.bucket_lengths(lengths, data_config(max_length=128, num_buckets=4)) == (
      32, 56, 80, 128)
  assert pipeline.bucket_lengths(lengths, data_config(max_length=64, num_buckets=1)) == (64,)
  explicit = data_config(max_length=64, bucket_lengths=(100, 16, 32))
  assert pipeline.bucket_lengths(lengths, explicit) == (16, 32, 64)
  with pytest.raises(ConfigError) as e:
    pipeline.bucket_lengths(lengths, data_config(num_buckets=0))
  assert_one_line(e, "data.num_buckets is 0")


def test_bucketing_cuts_padding_on_rotten_tomatoes(rt_train):
  buckets = pipeline.bucket_lengths(rt_train.lengths, data_config(num_buckets=4))
  assert len(buckets) == 4 and buckets[-1] == 64
  batches = list(pipeline.train_iterator(rt_train, global_batch_size=32, buckets=buckets,
                                         seed=0, num_epochs=1))
  widths = [b["input_ids"].shape[1] for b in batches]
  assert np.mean(widths) < 45, np.mean(widths)
  assert {b["input_ids"].shape for b in batches} <= {(32, L) for L in buckets}
  assert len(set(widths)) == len(buckets)
  for batch in batches:  # every row fits its bucket and padding is masked
    real = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert real.max() <= batch["input_ids"].shape[1]

  baseline = pipeline.bucket_lengths(rt_train.lengths, data_config(num_buckets=1))
  assert baseline == (64,)
  widths = {b["input_ids"].shape[1] for b in pipeline.train_iterator(
      rt_train, global_batch_size=32, buckets=baseline, seed=0, num_epochs=1)}
  assert widths == {64}


# ---------------------------------------------------------------- training order


def epoch_examples(batches):
  return [b["labels"].tolist() for b in batches]


def test_same_seed_same_batches_other_seed_or_epoch_differs():
  split = synthetic_split()
  make = lambda seed: pipeline.train_iterator(split, global_batch_size=16, buckets=BUCKETS,
                                              seed=seed, num_epochs=2)
  steps = pipeline.steps_per_epoch(split, global_batch_size=16, buckets=BUCKETS)
  run_a, run_b, run_c = list(make(0)), list(make(0)), list(make(1))
  assert_batches_equal(run_a, run_b)
  assert epoch_examples(run_a) != epoch_examples(run_c)
  assert epoch_examples(run_a[:steps]) != epoch_examples(run_a[steps:])
  assert len(run_a) == len(run_c) == 2 * steps
  widths = [b["input_ids"].shape[1] for b in run_a[:steps]]
  assert widths != sorted(widths)  # batches are shuffled across buckets, not bucket by bucket


def test_each_epoch_holds_each_example_at_most_once():
  split = synthetic_split(num_examples=997)
  batch_size = 16
  steps = pipeline.steps_per_epoch(split, global_batch_size=batch_size, buckets=BUCKETS)
  batches = list(pipeline.train_iterator(split, global_batch_size=batch_size, buckets=BUCKETS,
                                         seed=3, num_epochs=3))
  assert len(batches) == 3 * steps
  for epoch in range(3):
    seen = np.concatenate([b["labels"] for b in batches[epoch * steps:(epoch + 1) * steps]])
    assert len(seen) == len(set(seen.tolist()))
    assert 0 <= len(split) - len(seen) < batch_size
  for batch in batches:  # rows are the examples their labels name, right-padded
    assert batch["weights"].dtype == np.float32 and (batch["weights"] == 1).all()
    for row, i in enumerate(batch["labels"]):
      n = split.lengths[i]
      assert n <= batch["input_ids"].shape[1]
      np.testing.assert_array_equal(batch["input_ids"][row, :n], split.input_ids[i])
      assert batch["attention_mask"][row].sum() == n


def test_steps_per_epoch_carries_leftovers_to_larger_buckets():
  # Buckets of 10 examples each with batch 8: no bucket fills a second batch
  # alone, but the carried leftovers do: 40 examples -> 5 batches.
  input_ids = [np.ones(n, np.int32) for n in [4] * 10 + [12] * 10 + [20] * 10 + [28] * 10]
  split = pipeline.TokenizedSplit(input_ids, None, np.arange(40, dtype=np.int32))
  buckets = (8, 16, 24, 32)
  assert pipeline.steps_per_epoch(split, global_batch_size=8, buckets=buckets) == 5
  batches = list(pipeline.train_iterator(split, global_batch_size=8, buckets=buckets, seed=0,
                                         num_epochs=1))
  assert len(batches) == 5 and sum(len(b["labels"]) for b in batches) == 40


def test_resume_from_json_state_matches_uninterrupted_run():
  split = synthetic_split()
  make = lambda: pipeline.train_iterator(split, global_batch_size=16, buckets=BUCKETS, seed=5,
                                         num_epochs=2)
  steps = pipeline.steps_per_epoch(split, global_batch_size=16, buckets=BUCKETS)
  for k in (7, steps - 3):  # mid-epoch, and across the epoch boundary
    uninterrupted = make()
    take(uninterrupted, k)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    assert state["next_step"] == k
    resumed = make()
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), take(uninterrupted, 6))


def test_resume_refuses_a_state_from_another_plan():
  split = synthetic_split()
  first = pipeline.train_iterator(split, global_batch_size=16, buckets=BUCKETS, seed=5,
                                  num_epochs=1)
  take(first, 3)
  other = pipeline.train_iterator(split, global_batch_size=16, buckets=BUCKETS, seed=6,
                                  num_epochs=1)
  with pytest.raises(ConfigError) as e:
    other.set_state(first.get_state())
  assert_one_line(e, "seed=5", "seed=6")


def test_process_shards_concatenate_to_the_global_batch():
  split = synthetic_split()
  make = lambda index, count: pipeline.train_iterator(
      split, global_batch_size=16, buckets=BUCKETS, seed=2, num_epochs=1,
      process_index=index, process_count=count)
  global_batches = take(make(0, 1), 5)
  local_0, local_1 = take(make(0, 2), 5), take(make(1, 2), 5)
  for whole, a, b in zip(global_batches, local_0, local_1):
    assert a["input_ids"].shape[0] == 8
    joined = {key: np.concatenate([a[key], b[key]]) for key in a}
    assert_batches_equal([joined], [whole])
  with pytest.raises(ConfigError) as e:
    make(0, 3)
  assert_one_line(e, "16", "not divisible", "3 processes")


def test_an_objective_batches_its_own_examples_with_the_public_plan():
  """`batching` alone gives any objective's data bucketed, per-host, resumable global batches."""
  lengths = synthetic_split().lengths
  plan = batching.EpochPlan(lengths, global_batch_size=16, buckets=BUCKETS, seed=4)
  num_steps = 2 * plan.steps_per_epoch

  def make(index, count, seed=4):
    rows = batching.local_rows(16, index, count)

    def batch_at(step):  # an objective's own batch: here just the example ids and width
      length, examples = plan(step)
      return {"examples": examples[rows], "width": np.int32(length)}

    return batching.train_iterator(batch_at, num_steps=num_steps, identity={"seed": seed},
                                   steps_per_epoch=plan.steps_per_epoch)

  whole = list(make(0, 1))
  assert len(whole) == num_steps
  epoch = np.concatenate([b["examples"] for b in whole[:plan.steps_per_epoch]])
  assert len(set(epoch.tolist())) == len(epoch) and 0 <= len(lengths) - len(epoch) < 16
  assert all(b["width"] in BUCKETS and lengths[b["examples"]].max() <= b["width"] for b in whole)
  halves = [list(make(p, 2)) for p in range(2)]
  for a, b, w in zip(*halves, whole):
    np.testing.assert_array_equal(np.concatenate([a["examples"], b["examples"]]), w["examples"])
  resumed = make(0, 1)
  resumed.set_state({"next_step": 9, "seed": 4})
  assert_batches_equal(take(resumed, 3), whole[9:12])
  with pytest.raises(ConfigError) as e:
    make(0, 1, seed=5).set_state({"next_step": 9, "seed": 4})
  assert_one_line(e, "seed=4", "seed=5")


# ---------------------------------------------------------------- evaluation


def test_eval_batches_cover_every_example_once():
  split = synthetic_split(num_examples=203)
  batches = list(pipeline.eval_batches(split, global_batch_size=16, buckets=BUCKETS))
  weights = np.concatenate([b["weights"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  assert weights.sum() == len(split)
  assert sorted(labels[weights == 1].tolist()) == list(range(len(split)))
  assert (weights[weights != 1] == 0).all() and (weights == 0).any()
  assert {b["input_ids"].shape for b in batches} <= {(16, L) for L in BUCKETS}
  for batch in batches:  # filler rows still attend to something: no NaN softmax
    assert (batch["attention_mask"].sum(1) > 0).all()

  halves = [list(pipeline.eval_batches(split, global_batch_size=16, buckets=BUCKETS,
                                       process_index=p, process_count=2)) for p in range(2)]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
  assert_batches_equal(joined, batches)


# ---------------------------------------------------------------- sources


def test_jsonl_folder(rt_dir):
  dataset = sources.load_split(data_config(path=str(rt_dir)), "validation")
  assert len(dataset) == 1066 and {"text", "label"} <= set(dataset.column_names)
  first = sources.load_split(data_config(path=str(rt_dir)), "validation", max_examples=7)
  assert first["text"] == dataset["text"][:7]
  assert sources.split_file(str(rt_dir), "test").name == "test.jsonl"


def test_csv_file(tmp_path):
  file = tmp_path / "reviews.csv"
  file.write_text("sentence,label\n\"great, really\",1\nawful,0\n", encoding="utf-8")
  dataset = sources.load_split(data_config(path=str(file), text_column="sentence"), "train")
  assert dataset["sentence"] == ["great, really", "awful"] and dataset["label"] == [1, 0]


def test_tfds_mock_data(tokenizer):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = data_config(source="tfds", name="imdb_reviews")
  with tfds.testing.mock_data(num_examples=6):
    dataset = sources.load_split(config, "train")
  assert len(dataset) == 6 and dataset.column_names == ["text", "label"]
  assert all(isinstance(t, str) for t in dataset["text"])
  assert set(dataset["label"]) <= {0, 1}
  split = pipeline.tokenize_split(dataset, config, tokenizer, num_labels=2)
  assert len(split) == 6 and split.lengths.min() >= 2


def test_tfds_missing_column_lists_features():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=2), pytest.raises(ConfigError) as e:
    sources.load_split(data_config(source="tfds", name="imdb_reviews", text_column="review"),
                       "train")
  assert_one_line(e, "'review'", "available columns", "text")


def test_offline_hub_dataset_says_what_to_pass(tmp_path):
  # `datasets` reads the offline switches when imported: use a fresh process.
  code = ("from ftjax.data import sources; from tests.test_data import data_config\n"
          "sources.load_split(data_config(source='hf', "
          "name='cornell-movie-review-data/rotten_tomatoes'), 'train')")
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
         "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "ds")}
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("ftjax.errors.ConfigError: "), result.stderr[-2000:]
  for text in ("'cornell-movie-review-data/rotten_tomatoes'", "split 'train'",
               "--config.data.source=files --config.data.path=DIR"):
    assert text in last, last


def test_missing_column_lists_available(rt_dir):
  with pytest.raises(ConfigError) as e:
    sources.load_split(data_config(path=str(rt_dir), label_column="sentiment"), "validation")
  assert_one_line(e, "data.label_column 'sentiment'", "available columns: text, label")


def test_empty_split(tmp_path):
  (tmp_path / "train.jsonl").write_text("")
  (tmp_path / "validation.csv").write_text("text,label\n")
  for split in ("train", "validation"):
    with pytest.raises(ConfigError) as e:
      sources.load_split(data_config(path=str(tmp_path)), split)
    assert_one_line(e, f"split {split!r} is empty")


def test_not_utf8_file(tmp_path):
  (tmp_path / "train.jsonl").write_bytes('{"text": "café", "label": 0}\n'.encode("latin-1"))
  with pytest.raises(ConfigError) as e:
    sources.load_split(data_config(path=str(tmp_path)), "train")
  assert_one_line(e, str(tmp_path / "train.jsonl"), "is not UTF-8")


def test_invalid_json_file(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label"\n')
  with pytest.raises(ConfigError) as e:
    sources.load_split(data_config(path=str(tmp_path)), "train")
  assert_one_line(e, str(tmp_path / "train.jsonl"), "is not valid JSON")


def test_missing_file_or_folder(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
  with pytest.raises(ConfigError) as e:
    sources.load_split(data_config(path=str(tmp_path)), "test")
  assert_one_line(e, "no file for split 'test'", "test.jsonl")
  with pytest.raises(ConfigError) as e:
    sources.load_split(data_config(path=str(tmp_path / "nope")), "train")
  assert_one_line(e, "nope", "does not exist")


def test_unknown_source():
  with pytest.raises(ConfigError) as e:
    sources.load_split(data_config(source="s3"), "train")
  assert_one_line(e, "data.source is 's3'", "'files', 'hf', 'tfds'")
