"""A tiny random BERT written by ftjax itself, for tests that need chosen sizes and no PyTorch.

`tests/tiny.py` builds its model with transformers' PyTorch classes (4 heads,
intermediate 64); the sharding tests need dimensions that 8 devices divide,
and the multi-process test starts quickest without importing torch. The
checkpoint is a regular Hugging Face folder (`ftjax.models.save_pretrained`)
with MiniLM's tokenizer, read by `python -m ftjax.main` like any other.
"""

import pathlib
import shutil

import jax

from ftjax import models

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")


def make_model(folder: pathlib.Path, minilm_dir: pathlib.Path, *, hidden_size: int = 32,
               num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 64,
               dropout: float = 0.0, seed: int = 0) -> pathlib.Path:
  hf = {"model_type": "bert", "vocab_size": 30522, "hidden_size": hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "intermediate_size": intermediate_size, "max_position_embeddings": 64,
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
  config = models.FAMILIES["bert"].config_from_hf(hf, task="encoder", num_labels=None,
                                                  dtype="float32")
  params = models.Model.build(config).init(jax.random.key(seed))
  models.save_pretrained(params, config, folder)
  for name in TOKENIZER_FILES:
    shutil.copy(minilm_dir / name, folder / name)
  return folder


def make_data(folder: pathlib.Path, data_dir: pathlib.Path,
              sizes=(("train", 256), ("validation", 64))) -> pathlib.Path:
  """The first and last n/2 rotten_tomatoes examples of each split (the files list positives
  first, so both classes)."""
  folder.mkdir(parents=True, exist_ok=True)
  for split, n in sizes:
    lines = (data_dir / "rotten_tomatoes" / f"{split}.jsonl").read_text(
        encoding="utf-8").splitlines()
    (folder / f"{split}.jsonl").write_text("\n".join(lines[:n // 2] + lines[-(n - n // 2):])
                                           + "\n", encoding="utf-8")
  return folder
