"""Model FLOPs of a train step: MaxText's count for full fine-tuning, and what a strategy needs.

`maxtext_flops` is MaxText's `calculate_tflops_training_per_device`
(AI-Hypercomputer/maxtext, src/maxtext/utils/maxtext_utils.py) for the
architectures ftjax has (BERT-family encoders, Llama-family decoders);
`needed_flops` counts the same matmuls, with backward work only where a
strategy (freeze, head-only, LoRA) needs it. `scripts/benchmark.py` divides
them by step time and the device's peak for MFU.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What the FLOP count reads from a model config (MaxText's names)."""

  num_layers: int
  emb_dim: int
  num_query_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  num_mlp_inputs: int        # len(mlp_activations): 2 for SwiGLU (gate, up), 1 for GELU
  vocab_size: int            # of the LM head (the logits matmul); 0 without one
  causal: bool
  pre_norm: bool             # norms before the sublayers (Llama) or after (BERT)
  windows: tuple[int | None, ...]  # per layer: sliding window, or None
  head_dims: tuple[tuple[str, int, int], ...]  # per-example head matmuls: (path, in, out)
  layers_prefix: str         # "encoder/layers" or "decoder/layers"
  mlp_in: tuple[str, ...]    # ("up",) or ("gate", "up")
  word_embedding: str        # the LM head's weight when tied, else ""
  lm_head: str               # its path when untied, else ""

  def dense_weights(self) -> list[list[tuple[int, int]]]:
    """Each layer's weight matrices as (in, out), then the LM head's: MaxText's weight matmuls."""
    e, hd, kvd = self.emb_dim, self.num_query_heads * self.head_dim, self.num_kv_heads * self.head_dim
    layer = [(e, hd), (e, kvd), (e, kvd), (hd, e), *[(e, self.mlp_dim)] * self.num_mlp_inputs,
             (self.mlp_dim, e)]
    return [layer] * self.num_layers + ([[(e, self.vocab_size)]] if self.vocab_size else [])

  @classmethod
  def of(cls, config) -> "Architecture":
    """The architecture of an ftjax BERT-family or Llama-family model config."""
    from ftjax.models import heads  # pylint: disable=g-import-not-at-top  (jax loads late)
    if config.model_type in ("bert", "roberta", "distilbert"):
      head = []
      if heads.head_for(config.task) is heads.SequenceClassifier:
        if config.has_pooler:
          head.append(("pooler", config.hidden_size, config.hidden_size))
        if config.model_type in ("roberta", "distilbert") and config.pooling == "pooler":
          head.append(("classifier/dense", config.hidden_size, config.hidden_size))
        head.append(("classifier/out", config.hidden_size, config.num_labels))
      return cls(config.num_layers, config.hidden_size, config.num_heads, config.num_heads,
                 config.head_dim, config.intermediate_size, 1, 0, False, False,
                 (None,) * config.num_layers, tuple(head), "encoder/layers", ("up",), "", "")
    if config.model_type in ("llama", "mistral", "qwen2", "qwen3"):
      lm = heads.head_for(config.task) is heads.LMHead
      head = (() if lm else (("classifier/out", config.hidden_size, config.num_labels),))
      return cls(config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
                 config.head_dim, config.intermediate_size, 2,
                 config.vocab_size if lm else 0, True, True,
                 tuple(config.window(i) for i in range(config.num_layers)), head,
                 "decoder/layers", ("gate", "up"),
                 "embeddings/word/embedding" if lm and config.tie_word_embeddings else "",
                 "lm_head/kernel" if lm and not config.tie_word_embeddings else "")
    raise ValueError(f"no FLOP model for model_type {config.model_type!r}")


def maxtext_flops(arch: Architecture, batch: int, seq_len: int) -> float:
  """Training FLOPs of one step of full fine-tuning, as MaxText counts them.

  MaxText's `calculate_tflops_training_per_device`
  (AI-Hypercomputer/maxtext, src/maxtext/utils/maxtext_utils.py): per layer
  the FFN (`calculate_ffn_mamtul_tflops_per_device`: 2 B S mlp E per input
  projection, plus 2 B S mlp E for the output one), the q/k/v projections
  (2 B S E (H + 2 KV) D), the output projection (2 B S E H D) and attention
  (4 B S^2 H D, halved for a causal mask; a sliding window W makes it
  4 B S min(W, S) H D before halving, as its Gemma2 branch does); plus the
  logits matmul (its "embedding_flops", 2 B S E V); all x 3 for forward and
  backward. MaxText's B S is the per-device batch times max_target_length,
  i.e. the padded shape, as here. Added for encoders, which MaxText does not
  model: bidirectional attention is not halved (as MaxText's ViT encoders), and
  the classification head's per-example matmuls (pooler, classifier) x 3.
  """
  b, s = batch, seq_len
  e, h, kv, d = arch.emb_dim, arch.num_query_heads, arch.num_kv_heads, arch.head_dim
  ffn = 2 * b * s * arch.mlp_dim * e * arch.num_mlp_inputs + 2 * b * s * arch.mlp_dim * e
  qkv = 2 * b * s * e * (h + 2 * kv) * d
  projection = 2 * b * s * e * h * d
  attention = sum(_attention_flops(arch, b, s, w) for w in arch.windows)
  embedding = 2 * b * s * e * arch.vocab_size
  head = sum(2 * b * n_in * n_out for _, n_in, n_out in arch.head_dims)
  learnable_weight = ((ffn + qkv + projection) * arch.num_layers + embedding + head) * 3
  return learnable_weight + attention * 3


def _attention_flops(arch: Architecture, b: int, s: int, window: int | None) -> float:
  """One layer's forward attention FLOPs (QK^T and PV), as MaxText counts them."""
  keys = s if window is None else min(window, s)
  flops = 4 * b * s * keys * arch.num_query_heads * arch.head_dim
  return flops / 2 if arch.causal else flops


def needed_flops(arch: Architecture, trainable_paths: set[str], batch: int, seq_len: int,
                 lora_rank: int = 0) -> float:
  """FLOPs a strategy must compute for one step: MaxText's matmuls, backward only where needed.

  Every matmul counts its forward FLOPs once, once more for the gradient with
  respect to its input if that input depends on a trainable parameter (the
  backward pass has to reach through it), and once more for the gradient
  with respect to its weight if that weight is trainable. Attention's QK^T
  and PV count one forward's worth per operand whose gradient is needed.
  LoRA adapters (x A, then B) count as their own matmuls. With everything
  trainable this is `maxtext_flops`.
  """
  b, s = batch, seq_len
  e, h, kv, d = arch.emb_dim, arch.num_query_heads, arch.num_kv_heads, arch.head_dim
  tokens = b * s

  def trains(prefix: str) -> bool:  # Any trainable parameter under `prefix`.
    return any(p.startswith(prefix + "/") for p in trainable_paths)

  def matmul(prefix: str, n_in: int, n_out: int, rows: int, input_varies: bool) -> float:
    forward = 2 * rows * n_in * n_out
    flops = forward * (1 + input_varies + (prefix + "/kernel" in trainable_paths))
    if prefix + "/lora_a" in trainable_paths:  # h = x A (n_in x r), then h B (r x n_out)
      flops += 2 * rows * n_in * lora_rank * (2 + input_varies) + 2 * rows * lora_rank * n_out * 3
    return flops

  total = 0.0
  varies = trains("embeddings")  # Does the residual stream depend on a trainable parameter?
  for i, window in enumerate(arch.windows):
    layer = f"{arch.layers_prefix}/{i}"
    attn_in = varies or (arch.pre_norm and trains(f"{layer}/attention_norm"))
    q_varies, k_varies, v_varies = (attn_in or trains(f"{layer}/attention/{n}")
                                    for n in ("query", "key", "value"))
    total += matmul(f"{layer}/attention/query", e, h * d, tokens, attn_in)
    total += matmul(f"{layer}/attention/key", e, kv * d, tokens, attn_in)
    total += matmul(f"{layer}/attention/value", e, kv * d, tokens, attn_in)
    half = _attention_flops(arch, b, s, window) / 2  # QK^T; PV is the same
    total += half * (1 + q_varies + k_varies) + half * (1 + (q_varies or k_varies) + v_varies)
    context_varies = q_varies or k_varies or v_varies
    total += matmul(f"{layer}/attention/output", h * d, e, tokens, context_varies)
    varies = (varies or context_varies or trains(f"{layer}/attention/output")
              or trains(f"{layer}/attention_norm"))
    mlp_in = varies or (arch.pre_norm and trains(f"{layer}/mlp_norm"))
    for name in arch.mlp_in:
      total += matmul(f"{layer}/mlp/{name}", e, arch.mlp_dim, tokens, mlp_in)
    hidden_varies = mlp_in or any(trains(f"{layer}/mlp/{n}") for n in arch.mlp_in)
    total += matmul(f"{layer}/mlp/down", arch.mlp_dim, e, tokens, hidden_varies)
    varies = varies or hidden_varies or trains(f"{layer}/mlp/down") or trains(f"{layer}/mlp_norm")
  varies = varies or trains("final_norm")
  if arch.vocab_size:
    forward = 2 * tokens * e * arch.vocab_size
    weight = arch.lm_head or arch.word_embedding
    total += forward * (1 + varies + (weight in trainable_paths))
  for prefix, n_in, n_out in arch.head_dims:
    total += matmul(prefix, n_in, n_out, b, varies)
    varies = varies or trains(prefix)
  return total
