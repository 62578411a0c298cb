"""Preference pairs: tokenised with the template, two rows a pair padded together, the
response-only mask, cutting to max_length, the chat-messages form and bad records."""

import json
import pathlib

import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax import models
from ftjax.data import batching, preference
from ftjax.errors import ConfigError
from tests import tiny


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("pref_tok")
  tiny.make_tokenizer(root / "tok", data_dir)
  return models.load_tokenizer(str(root / "tok"))


def _write(folder: pathlib.Path, records, split="train"):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records),
                                         encoding="utf-8")
  return folder


def _data(path, **overrides):
  c = config_lib.default_config().data
  c.path = str(path)
  c.template = "raw"
  c.max_length = 64
  c.min_prompt_tokens = 4
  for k, v in overrides.items():
    c[k] = v
  return c


def test_real_hh_rlhf_pairs_rows_and_masks(tokenizer, data_dir):
  data = _data(data_dir / "preference", max_length=128)
  split = preference.load_split(data, "test", tokenizer, max_examples=20)
  assert len(split) == 20
  i = 0
  record = json.loads((data_dir / "preference" / "test.jsonl").read_text().splitlines()[0])
  eos = tokenizer.eos_token_id
  p = split.prompt_lengths[i]
  # Both rows share the prompt; each ends with EOS (unless cut) and decodes to its response.
  np.testing.assert_array_equal(split.input_ids[i][:p], split.rejected_ids[i][:p])
  chosen = tokenizer.decode(split.input_ids[i][p:], skip_special_tokens=True)
  assert record["chosen"].startswith(chosen[:20].strip()) or chosen.strip() in record["chosen"]
  batch = preference.make_batch(split, np.asarray([0, 3]), 128, np.ones(2, np.float32))
  assert batch["input_ids"].shape == (2, 2, 128) and batch["weights"].shape == (2,)
  for row, ids in (((0, 0), split.input_ids[0]), ((0, 1), split.rejected_ids[0]),
                   ((1, 0), split.input_ids[3])):
    n = len(ids)
    prompt = split.prompt_lengths[0 if row[0] == 0 else 3]
    assert batch["segment_ids"][row].sum() == n
    # The mask covers exactly the response tokens and EOS as targets.
    weights = batch["target_weights"][row]
    assert weights.sum() == n - prompt
    np.testing.assert_array_equal(batch["targets"][row][weights > 0], ids[prompt:])
  assert eos in split.input_ids[1]


def test_long_pairs_lose_prompt_start_then_response_end(tokenizer, tmp_path, caplog):
  long_prompt = " ".join(["word"] * 200)
  folder = _write(tmp_path / "d", [
      {"prompt": long_prompt + " end", "chosen": "yes fine", "rejected": "no"},
      {"prompt": "short", "chosen": " ".join(["a"] * 300), "rejected": "b"}])
  with caplog.at_level("INFO"):
    split = preference.load_split(_data(folder, max_length=32), "train", tokenizer)
  assert split.lengths.max() <= 32
  # Pair 0 kept the end of its prompt and whole responses.
  p = split.prompt_lengths[0]
  assert tokenizer.decode(split.input_ids[0][:p]).endswith("end")
  assert tokenizer.decode(split.input_ids[0][p:], skip_special_tokens=True) == "yes fine"
  assert len(split.input_ids[1]) == 32  # the long response was cut
  assert any("1 prompts lost their start and 1 responses" in r.getMessage()
             for r in caplog.records)


def test_fit_pair_drops_what_cannot_fit():
  assert preference.fit_pair(list(range(10)), [1, 2], [3], 10, 10)[0] == []
  p, c, r, cut_p, cut_r = preference.fit_pair(list(range(10)), [1, 2, 3], [4], 8, 2)
  assert p == [5, 6, 7, 8, 9] and c == [1, 2, 3] and r == [4] and cut_p and not cut_r


def test_chat_messages_form(tokenizer, tmp_path):
  user = {"role": "user", "content": "Say hi"}
  folder = _write(tmp_path / "chat", [
      {"chosen": [user, {"role": "assistant", "content": "hi there"}],
       "rejected": [user, {"role": "assistant", "content": "no"}]}])
  split = preference.load_split(_data(folder), "train", tokenizer)
  assert split.prompts[0].endswith("<|im_start|>assistant\n")
  p = split.prompt_lengths[0]
  assert tokenizer.decode(split.rejected_ids[0][p:], skip_special_tokens=True) == "no"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "has an empty chosen response"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "has an empty rejected response"),
])
def test_empty_response_is_one_line(tokenizer, tmp_path, record, message):
  folder = _write(tmp_path / "bad", [record])
  with pytest.raises(ConfigError, match=message):
    preference.load_split(_data(folder), "train", tokenizer)


def test_train_batches_pair_rows_and_one_shape_per_bucket(tokenizer, data_dir):
  data = _data(data_dir / "preference", max_length=96)
  split = preference.load_split(data, "test", tokenizer, max_examples=40)
  buckets = batching.bucket_lengths(split.lengths, data)
  it = preference.train_iterator(split, global_batch_size=4, buckets=buckets, seed=0,
                                 num_steps=6)
  for batch in it:
    assert batch["input_ids"].shape[:2] == (4, 2) and batch["input_ids"].shape[2] in buckets
    for k, i in enumerate(batch["pair_ids"]):
      n = len(split.rejected_ids[i])
      np.testing.assert_array_equal(batch["input_ids"][k, 1, :n], split.rejected_ids[i])
  total = sum(b["weights"].sum() for b in preference.eval_batches(
      split, global_batch_size=4, buckets=buckets))
  assert total == len(split)
