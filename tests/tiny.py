"""A tiny real run: a random 4-layer BERT with MiniLM's tokenizer on a slice of rotten_tomatoes.

Everything is written under the test's tmp folder (the shared data are read,
never copied into the repository).
"""

import json
import pathlib
import shutil

import torch
import transformers

from ftjax import config as config_lib

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")


def make_model(folder: pathlib.Path, minilm_dir: pathlib.Path, *, dropout: float = 0.1,
               num_layers: int = 4, hidden_size: int = 32) -> pathlib.Path:
  config = transformers.BertConfig(
      vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=num_layers,
      num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
      attention_probs_dropout_prob=dropout)
  torch.manual_seed(0)
  transformers.BertModel(config).save_pretrained(folder)
  for name in TOKENIZER_FILES:
    shutil.copy(minilm_dir / name, folder / name)
  return folder


def make_data(folder: pathlib.Path, data_dir: pathlib.Path, sizes=(("train", 256),
              ("validation", 64), ("test", 64)), dataset: str = "rotten_tomatoes") -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for split, n in sizes:
    lines = (data_dir / dataset / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    # The shared files list positives first: take both ends for both classes.
    lines = lines[:n // 2] + lines[-(n - n // 2):]
    assert {json.loads(line)["label"] for line in lines} == {0, 1}
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return folder


def config(model_dir: pathlib.Path, data_path: pathlib.Path, **overrides):
  c = config_lib.default_config()
  c.model.name_or_path = str(model_dir)
  c.model.num_labels = 2
  c.data.path = str(data_path)
  c.data.max_length = 32
  c.data.num_buckets = 2
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 2
  c.training.batch_size = 16
  c.training.num_steps = 6
  c.training.log_every_steps = 1
  c.eval.batch_size = 32
  c.eval.every_steps = 3
  c.checkpoint.max_to_keep = 5
  return config_lib.validate(config_lib.override(c, overrides))
