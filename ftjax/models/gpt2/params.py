"""Hugging Face weight names of GPT-2.

GPT-2's projections are `Conv1D`s whose weights are stored (in, out), so the
transform only reshapes (`CONV1D`); the fused `c_attn` stays fused as the
kernel `attention/qkv/kernel` (embed, 3, heads, kv). Task models nest the base
model under `transformer.`; original OpenAI-converted checkpoints have no
prefix at all, which the table accepts too. The heads (`lm_head`, `score`)
have rows of their own (`ftjax.models.heads`).
"""

from ftjax.models.keymap import CONV1D, CONV1D_IN2, FLATTEN, IDENTITY, KeyTable, Rule, norm_rules

_LAYER, _FLAX_LAYER = "h.{i}", "decoder/layers/{i}"


def _conv1d(hf: str, flax: str, *, in_dims: int = 1, split_bias: bool = False) -> tuple[Rule, ...]:
  """A GPT-2 Conv1D `hf.{weight,bias}` <-> Flax `flax/{kernel,bias}`."""
  return (Rule(f"{hf}.weight", f"{flax}/kernel", CONV1D_IN2 if in_dims == 2 else CONV1D),
          Rule(f"{hf}.bias", f"{flax}/bias", FLATTEN if split_bias else IDENTITY))


def _rules() -> tuple[Rule, ...]:
  rules = [Rule("wte.weight", "embeddings/word/embedding"),
           Rule("wpe.weight", "embeddings/position/embedding")]
  rules += norm_rules(f"{_LAYER}.ln_1", f"{_FLAX_LAYER}/attention_norm")
  rules += _conv1d(f"{_LAYER}.attn.c_attn", f"{_FLAX_LAYER}/attention/qkv", split_bias=True)
  rules += _conv1d(f"{_LAYER}.attn.c_proj", f"{_FLAX_LAYER}/attention/output", in_dims=2)
  rules += norm_rules(f"{_LAYER}.ln_2", f"{_FLAX_LAYER}/mlp_norm")
  rules += _conv1d(f"{_LAYER}.mlp.c_fc", f"{_FLAX_LAYER}/mlp/up")
  rules += _conv1d(f"{_LAYER}.mlp.c_proj", f"{_FLAX_LAYER}/mlp/down")
  rules += norm_rules("ln_f", "final_norm")
  return tuple(rules)


GPT2 = KeyTable(rules=_rules(), prefix="transformer.",
                # The causal-mask buffers older checkpoints saved.
                ignore=(r"(transformer[.])?h[.]\d+[.]attn[.](masked_)?bias",))
