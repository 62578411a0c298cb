"""Hugging Face weight names of BERT, RoBERTa and DistilBERT, one table each.

Read both ways: `keymap.import_params` maps a checkpoint onto the Flax tree of
`model.py`, `keymap.export_params` writes the tree back under these names.
"""

from ftjax.models.keymap import FLATTEN, IDENTITY, LINEAR, LINEAR_IN2, KeyTable, Rule


def _dense(hf: str, flax: str, *, in_dims: int = 1, split_bias: bool = False,
           base: bool = True, optional: bool = False) -> tuple[Rule, Rule]:
  """A PyTorch Linear `hf.{weight,bias}` <-> Flax `flax/{kernel,bias}`."""
  return (Rule(f"{hf}.weight", f"{flax}/kernel", LINEAR_IN2 if in_dims == 2 else LINEAR,
               base=base, optional=optional),
          Rule(f"{hf}.bias", f"{flax}/bias", FLATTEN if split_bias else IDENTITY,
               base=base, optional=optional))


def _norm(hf: str, flax: str) -> tuple[Rule, Rule]:
  return Rule(f"{hf}.weight", f"{flax}/scale"), Rule(f"{hf}.bias", f"{flax}/bias")


def _table(*, prefix: str, layer: str, embeddings: dict, names: dict, head: tuple,
           ignore: tuple[str, ...]) -> KeyTable:
  """One table from the HF names that differ between the three families."""
  flax_layer = "encoder/layers/{i}"
  rules = [Rule(f"embeddings.{hf}.weight", f"embeddings/{flax}/embedding")
           for flax, hf in embeddings.items()]
  rules += _norm("embeddings.LayerNorm", "embeddings/norm")
  for proj in ("query", "key", "value"):
    rules += _dense(f"{layer}.{names[proj]}", f"{flax_layer}/attention/{proj}", split_bias=True)
  rules += _dense(f"{layer}.{names['output']}", f"{flax_layer}/attention/output", in_dims=2)
  rules += _norm(f"{layer}.{names['attention_norm']}", f"{flax_layer}/attention_norm")
  rules += _dense(f"{layer}.{names['up']}", f"{flax_layer}/mlp/up")
  rules += _dense(f"{layer}.{names['down']}", f"{flax_layer}/mlp/down")
  rules += _norm(f"{layer}.{names['mlp_norm']}", f"{flax_layer}/mlp_norm")
  rules += head
  buffers = rf"({prefix.replace('.', '[.]')})?embeddings[.](position_ids|token_type_ids)"
  return KeyTable(rules=tuple(rules), prefix=prefix, ignore=(buffers,) + ignore)


_BERT_LAYER_NAMES = dict(
    query="attention.self.query", key="attention.self.key", value="attention.self.value",
    output="attention.output.dense", attention_norm="attention.output.LayerNorm",
    up="intermediate.dense", down="output.dense", mlp_norm="output.LayerNorm")
_BERT_EMBEDDINGS = dict(word="word_embeddings", position="position_embeddings",
                        token_type="token_type_embeddings")

BERT = _table(
    prefix="bert.", layer="encoder.layer.{i}", embeddings=_BERT_EMBEDDINGS,
    names=_BERT_LAYER_NAMES,
    head=(_dense("pooler.dense", "pooler", optional=True)
          + _dense("classifier", "classifier/out", base=False, optional=True)),
    # BertForPreTraining / BertForMaskedLM heads.
    ignore=(r"cls[.].*",))

ROBERTA = _table(
    prefix="roberta.", layer="encoder.layer.{i}", embeddings=_BERT_EMBEDDINGS,
    names=_BERT_LAYER_NAMES,
    head=(_dense("pooler.dense", "pooler", optional=True)
          + _dense("classifier.dense", "classifier/dense", base=False, optional=True)
          + _dense("classifier.out_proj", "classifier/out", base=False, optional=True)),
    ignore=(r"lm_head[.].*",))

DISTILBERT = _table(
    prefix="distilbert.", layer="transformer.layer.{i}",
    embeddings=dict(word="word_embeddings", position="position_embeddings"),
    names=dict(query="attention.q_lin", key="attention.k_lin", value="attention.v_lin",
               output="attention.out_lin", attention_norm="sa_layer_norm", up="ffn.lin1",
               down="ffn.lin2", mlp_norm="output_layer_norm"),
    head=(_dense("pre_classifier", "classifier/dense", base=False, optional=True)
          + _dense("classifier", "classifier/out", base=False, optional=True)),
    ignore=(r"vocab_(transform|layer_norm|projector)[.].*",))

TABLES = {"bert": BERT, "roberta": ROBERTA, "distilbert": DISTILBERT}
