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


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def make_tokenizer(folder: pathlib.Path, data_dir: pathlib.Path, vocab_size: int = 2048):
  """A small byte-level BPE tokenizer trained on the shared instruction data, saved to `folder`.

  EOS is `<|im_end|>` (id 2), padding `<pad>` (id 0), BOS `<s>` (id 1, not
  added automatically), with a ChatML chat template, like SmolLM2's.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  texts = []
  for name in ("instruction", "multitask"):
    for line in (data_dir / name / "train.jsonl").read_text(encoding="utf-8").splitlines()[:400]:
      texts += [v for v in json.loads(line).values() if isinstance(v, str)]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "<|im_end|>", "<|im_start|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
      additional_special_tokens=["<|im_start|>"])
  fast.chat_template = CHAT_TEMPLATE
  folder.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(folder)
  return fast


def make_decoder(folder: pathlib.Path, tokenizer_dir: pathlib.Path, *, model_type: str = "llama",
                 num_layers: int = 2, hidden_size: int = 32, seed: int = 0,
                 hf_overrides: dict | None = None) -> pathlib.Path:
  """A random tiny causal LM of `model_type` with the tokenizer of `tokenizer_dir`."""
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
  if model_type == "gpt2":
    config = transformers.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=4,
                                     n_positions=512, **common)
  else:
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=512,
        tie_word_embeddings=True, **common, **(hf_overrides or {}))
  torch.manual_seed(seed)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
  tok.save_pretrained(folder)
  return folder


def make_instruct_data(folder: pathlib.Path, data_dir: pathlib.Path, dataset: str,
                       sizes=(("train", 96), ("test", 16))) -> pathlib.Path:
  """The first examples of a shared instruction dataset's splits."""
  folder.mkdir(parents=True, exist_ok=True)
  for split, n in sizes:
    lines = (data_dir / dataset / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return folder


def lm_config(model_dir: pathlib.Path, data_path: pathlib.Path | None = None, **overrides):
  c = config_lib.default_config()
  c.model.name_or_path = str(model_dir)
  c.model.task = "causal_lm"
  if data_path is not None:
    c.data.path = str(data_path)
  c.data.max_length = 256
  c.data.train_split = "train"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 1
  c.training.batch_size = 8
  c.training.num_steps = 4
  c.training.log_every_steps = 1
  c.eval.splits = ("test",)
  c.eval.metric = "test/loss"
  c.eval.mode = "min"
  c.eval.batch_size = 8
  c.eval.every_steps = 2
  c.checkpoint.max_to_keep = 5
  return config_lib.validate(config_lib.override(c, overrides))
