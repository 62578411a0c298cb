"""Tiny random Hugging Face PyTorch models for parity tests."""

import numpy as np
import torch
import transformers

TINY = {
    "bert": lambda: transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, num_labels=3),
    "roberta": lambda: transformers.RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, num_labels=3),
    "distilbert": lambda: transformers.DistilBertConfig(
        vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64,
        num_labels=3),
}


def tiny_model(model_type: str, task: str, seed: int = 0) -> torch.nn.Module:
  config = TINY[model_type]()
  torch.manual_seed(seed)
  cls = (transformers.AutoModelForSequenceClassification if task == "classification"
         else transformers.AutoModel)
  return cls.from_config(config).eval()


def padded_batch(config, batch: int = 3, seq: int = 11, seed: int = 0):
  """Token ids of different lengths, padded with the model's pad id."""
  rng = np.random.RandomState(seed)
  pad = config.pad_token_id or 0
  input_ids = rng.randint(3, config.vocab_size, size=(batch, seq))
  lengths = np.linspace(seq, 3, batch).astype(int)
  attention_mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
  input_ids = np.where(attention_mask == 1, input_ids, pad)
  out = {"input_ids": input_ids, "attention_mask": attention_mask}
  if getattr(config, "type_vocab_size", 0) and config.type_vocab_size > 1:
    out["token_type_ids"] = (np.arange(seq)[None, :] >= lengths[:, None] // 2).astype(np.int32)
  return out


def torch_outputs(pt_model, inputs):
  with torch.no_grad():
    out = pt_model(**{k: torch.tensor(v) for k, v in inputs.items()}, output_hidden_states=True)
  logits = out.logits.numpy() if hasattr(out, "logits") else None
  return [h.numpy() for h in out.hidden_states], logits
