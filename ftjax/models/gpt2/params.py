"""Hugging Face weight names of GPT-2.

GPT-2's projections are `Conv1D`s whose weights are stored (in, out), so the
transform only reshapes (`CONV1D`); the fused `c_attn` stays fused as the
kernel `attention/qkv/kernel` (embed, 3, heads, kv). Task models nest the base
model under `transformer.`; original OpenAI-converted checkpoints have no
prefix at all, which the table accepts too.
"""

from ftjax.models.keymap import CONV1D, CONV1D_IN2, FLATTEN, IDENTITY, LINEAR, KeyTable, Rule

_LAYER, _FLAX_LAYER = "h.{i}", "decoder/layers/{i}"


def _conv1d(hf: str, flax: str, *, in_dims: int = 1, split_bias: bool = False) -> tuple[Rule, ...]:
  """A GPT-2 Conv1D `hf.{weight,bias}` <-> Flax `flax/{kernel,bias}`."""
  return (Rule(f"{hf}.weight", f"{flax}/kernel", CONV1D_IN2 if in_dims == 2 else CONV1D),
          Rule(f"{hf}.bias", f"{flax}/bias", FLATTEN if split_bias else IDENTITY))


def _norm(hf: str, flax: str) -> tuple[Rule, Rule]:
  return Rule(f"{hf}.weight", f"{flax}/scale"), Rule(f"{hf}.bias", f"{flax}/bias")


def _rules() -> tuple[Rule, ...]:
  rules = [Rule("wte.weight", "embeddings/word/embedding"),
           Rule("wpe.weight", "embeddings/position/embedding")]
  rules += _norm(f"{_LAYER}.ln_1", f"{_FLAX_LAYER}/attention_norm")
  rules += _conv1d(f"{_LAYER}.attn.c_attn", f"{_FLAX_LAYER}/attention/qkv", split_bias=True)
  rules += _conv1d(f"{_LAYER}.attn.c_proj", f"{_FLAX_LAYER}/attention/output", in_dims=2)
  rules += _norm(f"{_LAYER}.ln_2", f"{_FLAX_LAYER}/mlp_norm")
  rules += _conv1d(f"{_LAYER}.mlp.c_fc", f"{_FLAX_LAYER}/mlp/up")
  rules += _conv1d(f"{_LAYER}.mlp.c_proj", f"{_FLAX_LAYER}/mlp/down")
  rules += _norm("ln_f", "final_norm")
  # Task heads (PyTorch Linears). A tied LM head has no parameter of its own.
  rules.append(Rule("lm_head.weight", "lm_head/kernel", LINEAR, base=False, optional=True))
  rules.append(Rule("score.weight", "classifier/out/kernel", LINEAR, base=False, optional=True))
  return tuple(rules)


GPT2 = KeyTable(rules=_rules(), prefix="transformer.",
                # The causal-mask buffers older checkpoints saved.
                ignore=(r"(transformer[.])?h[.]\d+[.]attn[.](masked_)?bias",))
