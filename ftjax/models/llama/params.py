"""Hugging Face weight names of the Llama-family backbone (Llama, Mistral, Qwen2, Qwen3): one table.

The four share one naming scheme; a tensor a variant lacks (Qwen3's q_norm in
a Llama) simply has no parameter to fill, and import then fails naming it.
Task models nest the base model under `model.`; their heads (`lm_head`,
`score`) sit beside it, with rows of their own (`ftjax.models.heads`).
"""

from ftjax.models.keymap import KeyTable, Rule, dense_rules, norm_rules

_LAYER, _FLAX_LAYER = "layers.{i}", "decoder/layers/{i}"


def _rules() -> tuple[Rule, ...]:
  rules = [Rule("embed_tokens.weight", "embeddings/word/embedding")]
  for hf, flax in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    rules += dense_rules(f"{_LAYER}.self_attn.{hf}", f"{_FLAX_LAYER}/attention/{flax}",
                         split_bias=True)
  rules += dense_rules(f"{_LAYER}.self_attn.o_proj", f"{_FLAX_LAYER}/attention/output",
                       in_dims=2)
  for hf, flax in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
    rules += norm_rules(f"{_LAYER}.self_attn.{hf}", f"{_FLAX_LAYER}/attention/{flax}",
                        bias=False)
  rules += norm_rules(f"{_LAYER}.input_layernorm", f"{_FLAX_LAYER}/attention_norm", bias=False)
  rules += norm_rules(f"{_LAYER}.post_attention_layernorm", f"{_FLAX_LAYER}/mlp_norm",
                      bias=False)
  for proj in ("gate", "up", "down"):
    rules += dense_rules(f"{_LAYER}.mlp.{proj}_proj", f"{_FLAX_LAYER}/mlp/{proj}")
  rules += norm_rules("norm", "final_norm", bias=False)
  return tuple(rules)


LLAMA = KeyTable(rules=_rules(), prefix="model.",
                 # Non-persistent RoPE buffers that older checkpoints saved.
                 ignore=(r"(model[.])?layers[.]\d+[.]self_attn[.]rotary_emb[.]inv_freq",))
