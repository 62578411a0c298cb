"""LoRA adapters exported as PEFT adapters load in PyTorch PEFT and compute ftjax's logits.

Each case: a tiny random HF model saved with `save_pretrained`, loaded by
ftjax, LoRA added with a random (trained-looking) B, exported with
`hf_adapter.save_adapter`; then `peft.PeftModel.from_pretrained(base, dir)`
in PyTorch must give the same logits, and `hf_adapter.load_adapter` must
rebuild the same ftjax model.
"""

import json

import jax
import numpy as np
import peft
import pytest
import torch

from ftjax import models
from ftjax.errors import CheckpointError
from ftjax.models import keymap
from ftjax.peft import hf_adapter, lora
from tests import hf_models

TOL = 1e-4

CASES = [
    # (model type, task, targets, PEFT target_modules written)
    ("llama", "causal_lm", (r".*/attention/(query|value)",), ["q_proj", "v_proj"]),
    ("qwen3", "causal_lm", ("all-linear",),
     ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("mistral", "causal_lm", (r"decoder/layers/1/attention/query",),
     ["model.layers.1.self_attn.q_proj"]),
    ("gpt2", "causal_lm", (r".*/attention/qkv",), ["c_attn"]),
    ("bert", "classification", (r".*/attention/(query|value)",), ["query", "value"]),
]


def _randomize_b(params, seed=0):
  flat = dict(keymap.flatten(params))
  rng = np.random.default_rng(seed)
  for path in lora.lora_paths(params):
    if path.endswith("lora_b"):
      flat[path] = jax.numpy.asarray(rng.normal(0, 0.3, flat[path].shape), np.float32)
  return keymap.unflatten(flat, params)


def _torch_model(model_type, task):
  if model_type in hf_models.TINY:
    return hf_models.tiny_model(model_type, task)
  return hf_models.tiny_decoder(model_type, task)


@pytest.mark.parametrize("model_type, task, targets, written", CASES,
                         ids=[f"{c[0]}-{c[2][0][-12:]}" for c in CASES])
def test_peft_adapter_roundtrip(model_type, task, targets, written, tmp_path):
  pt_model = _torch_model(model_type, task)
  pt_model.save_pretrained(tmp_path / "base")
  model, params = models.from_pretrained(str(tmp_path / "base"), task=task)
  # A trained head (PEFT's modules_to_save): other values than the base's.
  head = [p for p in keymap.flatten(params) if p.startswith("classifier/")]
  flat = dict(keymap.flatten(params))
  for i, path in enumerate(head):
    flat[path] = jax.random.normal(jax.random.key(i), flat[path].shape)
  params = keymap.unflatten(flat, params)
  lora_model, lora_params = lora.add_lora(model, params,
                                          lora.LoraSpec(rank=4, alpha=8.0, targets=targets),
                                          jax.random.key(1))
  lora_params = _randomize_b(lora_params)
  hf_adapter.save_adapter(lora_model, lora_params, tmp_path / "adapter",
                          base_model_name_or_path=str(tmp_path / "base"), modules_to_save=head)
  config = json.loads((tmp_path / "adapter" / hf_adapter.CONFIG_FILE).read_text())
  assert sorted(config["target_modules"]) == written
  assert (config["r"], config["lora_alpha"]) == (4, 8.0)

  batch = hf_models.padded_batch(pt_model.config)
  inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
  ours = np.asarray(lora_model.apply(lora_params, *inputs.values()).logits)
  base = np.asarray(model.apply(params, *inputs.values()).logits)
  real = inputs["attention_mask"].astype(bool) if task == "causal_lm" else slice(None)
  assert np.abs(ours - base)[real].max() > 100 * TOL  # the adapter matters

  peft_model = peft.PeftModel.from_pretrained(_torch_model(model_type, task),
                                              str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = peft_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  assert np.abs(ours - theirs)[real].max() < TOL

  back_model, back_params = hf_adapter.load_adapter(model, params, tmp_path / "adapter")
  np.testing.assert_allclose(np.asarray(back_model.apply(back_params, *inputs.values()).logits), ours,
                             atol=1e-6)


def test_importing_a_peft_trained_adapter(tmp_path):
  """An adapter made by PEFT itself (not ftjax's export) imports and matches."""
  pt_model = hf_models.tiny_decoder("llama", "causal_lm")
  pt_model.save_pretrained(tmp_path / "base")
  peft_model = peft.get_peft_model(
      hf_models.tiny_decoder("llama", "causal_lm"),
      peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "down_proj"]))
  torch.manual_seed(3)
  for name, p in peft_model.named_parameters():
    if "lora_B" in name:
      torch.nn.init.normal_(p, std=0.3)
  peft_model.save_pretrained(tmp_path / "adapter")
  batch = hf_models.padded_batch(pt_model.config)
  inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
  with torch.no_grad():
    theirs = peft_model.eval()(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  model, params = models.from_pretrained(str(tmp_path / "base"), task="causal_lm")
  lora_model, lora_params = hf_adapter.load_adapter(model, params, tmp_path / "adapter")
  (spec,) = lora_model.adapters
  assert isinstance(spec, lora.LoraSpec) and spec.rank == 2 and spec.scale == 3.0
  ours = np.asarray(lora_model.apply(lora_params, *inputs.values()).logits)
  real = inputs["attention_mask"].astype(bool)
  assert np.abs(ours - theirs)[real].max() < TOL


def test_unsupported_adapters_are_refused_in_one_line(tmp_path):
  pt_model = hf_models.tiny_decoder("llama", "causal_lm")
  pt_model.save_pretrained(tmp_path / "base")
  model, params = models.from_pretrained(str(tmp_path / "base"), task="causal_lm")
  with pytest.raises(CheckpointError, match="no adapter_config.json"):
    hf_adapter.load_adapter(model, params, tmp_path)
  peft.get_peft_model(hf_models.tiny_decoder("llama", "causal_lm"),
                      peft.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only")
                      ).save_pretrained(tmp_path / "bias")
  with pytest.raises(CheckpointError, match="sets bias='lora_only'; expected 'none'"):
    hf_adapter.load_adapter(model, params, tmp_path / "bias")
  with pytest.raises(CheckpointError, match="needs a model with LoRA adapters"):
    hf_adapter.save_adapter(model, params, tmp_path / "x")
