"""Heads apart from backbones: each head's own key rows, pooling, and a head added from outside.

The parity tests check every head against transformers; these check the
contract that lets a new head be added in `ftjax.models.heads` alone.
"""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from ftjax import models
from ftjax.errors import ConfigError
from ftjax.models import heads, keymap, layers, registry
from tests import hf_models

HEAD_CASES = [(model_type, task) for model_type, family in registry.FAMILIES.items()
              for task in family.task_heads]


def _hf(model_type: str, **overrides) -> dict:
  make = hf_models.TINY.get(model_type) or hf_models.TINY_DECODERS[model_type]
  return {**make().to_dict(), **overrides}


def _config(model_type: str, task: str, pooling: str = "pooler", **overrides):
  return registry.FAMILIES[model_type].config_from_hf(
      _hf(model_type, **overrides), task=task, num_labels=None, dtype="float32", pooling=pooling)


def _batch(pad_id: int):
  rng = np.random.RandomState(0)
  mask = (np.arange(9)[None] < np.array([[9], [5], [2]])).astype(np.int32)
  return np.where(mask == 1, rng.randint(3, 99, size=(3, 9)), pad_id), mask


def test_every_family_has_both_heads_where_transformers_does():
  assert {t: sorted(f.task_heads) for t, f in registry.FAMILIES.items()} == {
      **{t: ["classification"] for t in ("bert", "roberta", "distilbert")},
      **{t: ["causal_lm", "classification"]
         for t in ("llama", "mistral", "qwen2", "qwen3", "gpt2")}}


@pytest.mark.parametrize("model_type, task", HEAD_CASES)
def test_head_parameters_are_its_own_rows_and_round_trip(model_type, task, tmp_path):
  family = registry.FAMILIES[model_type]
  head = family.task_heads[task]
  rows = head.rows(family.head_style)
  # Untied, so every head has a parameter to map.
  config = _config(model_type, task, tie_word_embeddings=False)
  model = models.Model.build(config)
  params = model.init(jax.random.key(0))
  flat = keymap.flatten(params)
  head_paths = {p for p in flat if p.split("/")[0] == head.ATTR}
  assert head_paths == {rule.flax for rule in rows}
  assert not any(family.backbone_table.match_flax(p, task_model=True) for p in head_paths)

  models.save_pretrained(params, config, tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  assert {name for name in tensors if not name.startswith(family.backbone_table.prefix)} == {
      rule.hf for rule in rows}
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
      family.architectures[task]]
  loaded = models.load_pretrained(str(tmp_path), task=task)
  assert loaded.new_paths == ()
  back = keymap.flatten(loaded.params)
  assert back.keys() == flat.keys()
  for path, value in flat.items():
    np.testing.assert_array_equal(back[path], value, err_msg=path)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_tied_lm_head_has_no_parameter_and_reads_the_embedding(model_type):
  model = models.Model.build(_config(model_type, "causal_lm", tie_word_embeddings=True))
  params = model.init(jax.random.key(1))
  assert "lm_head" not in params
  ids, mask = _batch(0)
  out = model.apply(params, ids, mask)
  embedding_ve = params["embeddings"]["word"]["embedding"]
  np.testing.assert_allclose(out.logits, out.last_hidden_state @ embedding_ve.T, atol=1e-5)
  np.testing.assert_array_equal(model.apply(params, ids, mask, method="hidden_states"),
                                out.last_hidden_state)


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_encoder_pooling_then_classify_is_the_forward_pass(pooling):
  model = models.Model.build(_config("roberta", "classification", pooling))
  params = model.init(jax.random.key(2))
  ids, mask = _batch(1)
  out = model.apply(params, ids, mask)
  features = model.apply(params, ids, mask, method="features")
  h = np.asarray(out.last_hidden_state)
  if pooling == "mean":
    expected = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  else:  # RoBERTa's HF head reads h[:, 0] through its own dense layer.
    expected = h[:, 0]
  np.testing.assert_allclose(features, expected, atol=1e-6)
  assert ("dense" in params["classifier"]) == (pooling == "pooler")
  assert "pooler" not in params  # RoBERTa's classifier never reads the pooler.
  np.testing.assert_allclose(model.apply(params, features, method="classify"), out.logits,
                             atol=1e-6)


def test_bert_classifier_reads_the_pooler_output():
  model = models.Model.build(_config("bert", "classification"))
  params = model.init(jax.random.key(3))
  ids, mask = _batch(0)
  out = model.apply(params, ids, mask)
  pooler = params["pooler"]
  np.testing.assert_allclose(
      out.pooled, np.tanh(out.last_hidden_state[:, 0] @ pooler["kernel"] + pooler["bias"]),
      atol=1e-5)
  np.testing.assert_array_equal(model.apply(params, ids, mask, method="features"), out.pooled)


@pytest.mark.parametrize("build, match", [
    (lambda: models.Model.build(_config("bert", "causal_lm")),
     r"task 'causal_lm' has no head in a bert model"),
    (lambda: models.Model.build(_config("llama", "regression")),
     r"task 'regression' has no head; expected one of"),
    (lambda: _config("qwen2", "classification", pooling="mean"),
     r"pooling='mean' is not supported by decoder classifiers; "
     r"expected one of \('pooler', 'last'\)"),
    (lambda: _config("bert", "classification", pooling="last"),
     r"pooling='last' is not supported by bert classifiers"),
])
def test_bad_task_or_pooling_is_one_line(build, match):
  with pytest.raises(ConfigError, match=match) as e:
    build()
  assert "\n" not in str(e.value)


def test_features_of_a_bare_backbone_is_one_line():
  model = models.Model.build(_config("bert", "encoder"))
  params = model.init(jax.random.key(0))
  with pytest.raises(ConfigError, match="'features' needs a task head; this is a bare encoder"):
    model.apply(params, *_batch(0), method="features")


class TokenClassifier(nnx.Module):
  """A head the library has never seen: per-token labels, as BertForTokenClassification."""

  TASK = "token_classification"
  ATTR = "classifier"
  HF_SUFFIX = "ForTokenClassification"

  def __init__(self, cfg, *, rngs):
    self.dropout = nnx.Dropout(cfg.classifier_dropout)
    self.out = layers.Dense(cfg.hidden_size, cfg.num_labels, axes=("embed", "labels"),
                            init_std=cfg.initializer_range, dtype=jax.numpy.dtype(cfg.dtype),
                            rngs=rngs)

  @classmethod
  def create(cls, cfg, style, *, word_embedding, rngs):
    del style, word_embedding
    return cls(cfg, rngs=rngs)

  @classmethod
  def reads(cls, style, pooling):
    del style, pooling
    return "tokens"

  @classmethod
  def rows(cls, style):
    return keymap.dense_rules("classifier", "classifier/out", base=False,
                              optional=True) if style == "bert" else None

  @classmethod
  def check_export(cls, cfg):
    del cfg

  @classmethod
  def hf_config(cls, hf, num_labels):
    return heads.SequenceClassifier.hf_config(hf, num_labels)

  def __call__(self, hidden_bte, *, deterministic=True, rngs=None):
    x_bte = self.dropout(hidden_bte, deterministic=deterministic, rngs=rngs)
    return self.out(x_bte, deterministic=deterministic, rngs=rngs)


def test_a_new_head_loads_runs_and_exports_without_touching_the_family(monkeypatch, tmp_path):
  monkeypatch.setitem(heads.HEADS, TokenClassifier.TASK, TokenClassifier)
  assert registry.FAMILIES["bert"].architectures[TokenClassifier.TASK] == (
      "BertForTokenClassification")
  assert TokenClassifier.TASK not in registry.FAMILIES["llama"].task_heads
  torch.manual_seed(0)
  pt_model = transformers.BertForTokenClassification(hf_models.TINY["bert"]()).eval()
  pt_model.save_pretrained(tmp_path / "hf")
  inputs = hf_models.padded_batch(pt_model.config)
  with torch.no_grad():
    want = pt_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()

  model, params = models.from_pretrained(str(tmp_path / "hf"), task=TokenClassifier.TASK)
  assert "pooler" not in params and set(params["classifier"]["out"]) == {"kernel", "bias"}
  got = model.apply(params, **inputs).logits
  assert got.shape == (3, 11, 3)
  np.testing.assert_allclose(got, want, atol=1e-4)

  models.save_pretrained(params, model.config, tmp_path / "out")
  back = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out").eval()
  assert type(back).__name__ == "BertForTokenClassification"
  with torch.no_grad():
    again = back(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  np.testing.assert_allclose(again, want, atol=1e-5)
