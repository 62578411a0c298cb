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


# Decoders: tiny, but each exercises what its family adds. Llama: grouped
# queries (2 kv heads for 4 heads), llama3 RoPE scaling (a short original
# context so the scaling changes frequencies) and a tied LM head. Mistral: a
# sliding window shorter than the test sequences. Qwen2: q/k/v biases and a
# non-default rope theta. Qwen3: q/k norms, head_dim != hidden / heads and
# attention_bias. pad_token_id is set so classification finds the last token.
_DECODER_SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                      pad_token_id=0, num_labels=3)
TINY_DECODERS = {
    "llama": lambda **kw: transformers.LlamaConfig(**{
        **_DECODER_SIZES, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16}, **kw}),
    "mistral": lambda **kw: transformers.MistralConfig(**{
        **_DECODER_SIZES, "sliding_window": 4, "tie_word_embeddings": False, **kw}),
    "qwen2": lambda **kw: transformers.Qwen2Config(**{
        **_DECODER_SIZES, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, **kw}),
    "qwen3": lambda **kw: transformers.Qwen3Config(**{
        **_DECODER_SIZES, "head_dim": 16, "attention_bias": True, "tie_word_embeddings": False,
        **kw}),
    "gpt2": lambda **kw: transformers.GPT2Config(**{
        "vocab_size": 99, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
        "pad_token_id": 0, "num_labels": 3, **kw}),
}

DECODER_CLASSES = {
    "decoder": transformers.AutoModel,
    "causal_lm": transformers.AutoModelForCausalLM,
    "classification": transformers.AutoModelForSequenceClassification,
}


def tiny_decoder(model_type: str, task: str, seed: int = 0, **config) -> torch.nn.Module:
  hf_config = TINY_DECODERS[model_type](**config)
  torch.manual_seed(seed)
  return DECODER_CLASSES[task].from_config(hf_config).eval()


def left_padded_batch(config, batch: int = 3, seq: int = 11, seed: int = 0):
  """`padded_batch`, with the padding moved to the left (as prompts for generation)."""
  right = padded_batch(config, batch, seq, seed)
  lengths = right["attention_mask"].sum(axis=1)
  return {k: np.stack([np.roll(row, seq - n) for row, n in zip(v, lengths)])
          for k, v in right.items()}


def positions(attention_mask: np.ndarray) -> np.ndarray:
  """cumsum(mask) - 1 clipped at 0: the position_ids transformers' generate passes."""
  return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
