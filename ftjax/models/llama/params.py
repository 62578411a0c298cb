"""Hugging Face weight names of the Llama family (Llama, Mistral, Qwen2, Qwen3): one table.

The four share one naming scheme; a tensor a variant lacks (Qwen3's q_norm in
a Llama) simply has no parameter to fill, and import then fails naming it.
Task models nest the base model under `model.`; the LM head (`lm_head`) and
the sequence classifier (`score`) sit beside it.
"""

from ftjax.models.keymap import FLATTEN, IDENTITY, LINEAR, LINEAR_IN2, KeyTable, Rule

_LAYER, _FLAX_LAYER = "layers.{i}", "decoder/layers/{i}"


def _dense(hf: str, flax: str, *, in_dims: int = 1, split_bias: bool = False,
           base: bool = True, optional: bool = False) -> tuple[Rule, ...]:
  """A PyTorch Linear `hf.{weight,bias}` <-> Flax `flax/{kernel,bias}`."""
  return (Rule(f"{hf}.weight", f"{flax}/kernel", LINEAR_IN2 if in_dims == 2 else LINEAR,
               base=base, optional=optional),
          Rule(f"{hf}.bias", f"{flax}/bias", FLATTEN if split_bias else IDENTITY,
               base=base, optional=optional))


def _rules() -> tuple[Rule, ...]:
  rules = [Rule("embed_tokens.weight", "embeddings/word/embedding")]
  for hf, flax in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    rules += _dense(f"{_LAYER}.self_attn.{hf}", f"{_FLAX_LAYER}/attention/{flax}",
                    split_bias=True)
  rules += _dense(f"{_LAYER}.self_attn.o_proj", f"{_FLAX_LAYER}/attention/output", in_dims=2)
  for hf, flax in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
    rules.append(Rule(f"{_LAYER}.self_attn.{hf}.weight", f"{_FLAX_LAYER}/attention/{flax}/scale"))
  rules.append(Rule(f"{_LAYER}.input_layernorm.weight", f"{_FLAX_LAYER}/attention_norm/scale"))
  rules.append(Rule(f"{_LAYER}.post_attention_layernorm.weight",
                    f"{_FLAX_LAYER}/mlp_norm/scale"))
  for proj in ("gate", "up", "down"):
    rules += _dense(f"{_LAYER}.mlp.{proj}_proj", f"{_FLAX_LAYER}/mlp/{proj}")
  rules.append(Rule("norm.weight", "final_norm/scale"))
  # Task heads. A tied LM head has no parameter of its own: a checkpoint's
  # lm_head.weight is then skipped, and none is exported (transformers ties it).
  rules.append(Rule("lm_head.weight", "lm_head/kernel", LINEAR, base=False, optional=True))
  rules.append(Rule("score.weight", "classifier/out/kernel", LINEAR, base=False, optional=True))
  return tuple(rules)


LLAMA = KeyTable(rules=_rules(), prefix="model.",
                 # Non-persistent RoPE buffers that older checkpoints saved.
                 ignore=(r"(model[.])?layers[.]\d+[.]self_attn[.]rotary_emb[.]inv_freq",))
