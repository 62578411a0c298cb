"""BERT, RoBERTa, DistilBERT: ftjax equals PyTorch transformers, both ways.

A tiny random HF model is saved with `save_pretrained`, loaded by ftjax and
compared on a padded batch; ftjax's export is then loaded by transformers
(no missing or unexpected keys) and compared again.
"""

import jax
import numpy as np
import pytest
import transformers

from ftjax import models
from tests import hf_models

TOL = 1e-4


def _ftjax_outputs(model, params, inputs):
  out = jax.jit(model.apply)(params, **inputs)
  logits = None if out.logits is None else np.asarray(out.logits)
  return [np.asarray(h) for h in out.hidden_states], logits


def _max_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("task", ["encoder", "classification"])
@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_parity_and_export_roundtrip(model_type, task, tmp_path):
  pt_model = hf_models.tiny_model(model_type, task)
  # Sharded safetensors for one task, a single file for the other: both load.
  pt_model.save_pretrained(tmp_path / "hf", max_shard_size="30KB" if task == "encoder" else "5GB")
  sharded = (tmp_path / "hf" / "model.safetensors.index.json").is_file()
  assert sharded == (task == "encoder")
  inputs = hf_models.padded_batch(pt_model.config)
  assert inputs["attention_mask"].min() == 0  # the batch really is padded
  ref_hidden, ref_logits = hf_models.torch_outputs(pt_model, inputs)

  model, params = models.from_pretrained(str(tmp_path / "hf"), task=task)
  hidden, logits = _ftjax_outputs(model, params, inputs)
  assert len(hidden) == pt_model.config.num_hidden_layers + 1
  assert _max_diff(hidden, ref_hidden) < TOL
  if task == "classification":
    assert logits.shape == (3, 3)
    assert np.abs(logits - ref_logits).max() < TOL

  models.save_pretrained(params, model.config, tmp_path / "export")
  cls = (transformers.AutoModelForSequenceClassification if task == "classification"
         else transformers.AutoModel)
  reloaded, info = cls.from_pretrained(tmp_path / "export", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  assert type(reloaded) is type(pt_model)
  re_hidden, re_logits = hf_models.torch_outputs(reloaded.eval(), inputs)
  assert _max_diff(re_hidden, hidden) < TOL
  if task == "classification":
    assert np.abs(re_logits - logits).max() < TOL


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_classifier_from_bare_encoder_checkpoint(model_type, tmp_path, caplog):
  """A pre-trained encoder (no head) loads for classification: only the head is new."""
  pt_model = hf_models.tiny_model(model_type, "encoder")
  pt_model.save_pretrained(tmp_path)
  with caplog.at_level("WARNING"):
    model, params = models.from_pretrained(str(tmp_path), task="classification", num_labels=5)
  new_lines = [r.getMessage() for r in caplog.records if "Newly initialized" in r.getMessage()]
  assert len(new_lines) == 1
  assert "classifier/out/kernel" in new_lines[0]
  assert "encoder/" not in new_lines[0] and "embeddings/" not in new_lines[0]
  inputs = hf_models.padded_batch(pt_model.config)
  hidden, logits = _ftjax_outputs(model, params, inputs)
  ref_hidden, _ = hf_models.torch_outputs(pt_model, inputs)
  assert _max_diff(hidden, ref_hidden) < TOL
  assert logits.shape == (3, 5) and np.isfinite(logits).all()


def test_head_with_other_number_of_labels_is_replaced(tmp_path, caplog):
  pt_model = hf_models.tiny_model("roberta", "classification")  # 3 labels
  pt_model.save_pretrained(tmp_path)
  with caplog.at_level("INFO"):
    model, params = models.from_pretrained(str(tmp_path), task="classification", num_labels=2)
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "classifier.out_proj.weight (shape (3, 32), the model needs (2, 32))" in messages
  assert params["classifier"]["out"]["kernel"].shape == (32, 2)
  # The rest of the head (classifier/dense) is still the checkpoint's.
  np.testing.assert_array_equal(params["classifier"]["dense"]["kernel"],
                                pt_model.classifier.dense.weight.detach().numpy().T)
  assert model.config.num_labels == 2


def test_attention_dropout_path_matches_fused_path_without_dropout(tmp_path):
  """The explicit attention used for training with dropout equals the fused one at rate 0."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ftjax.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  q, k, v = (rng.randn(2, 5, 3, 4).astype(np.float32) for _ in range(3))
  mask = layers.padding_mask(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
  fused = layers.attention(q, k, v, mask, dropout=nnx.Dropout(0.0), deterministic=True,
                           rngs=None)
  explicit = layers.attention(q, k, v, mask, dropout=nnx.Dropout(1e-9), deterministic=False,
                              rngs=nnx.Rngs(dropout=0))
  np.testing.assert_allclose(explicit, fused, atol=1e-6)
  dropped = layers.attention(q, k, v, mask, dropout=nnx.Dropout(0.5), deterministic=False,
                             rngs=nnx.Rngs(dropout=0))
  assert np.abs(np.asarray(dropped) - np.asarray(fused)).max() > 1e-3
