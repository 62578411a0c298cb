"""Hugging Face weight names of the BERT, RoBERTa and DistilBERT backbones, one table each.

Read both ways: `keymap.import_params` maps a checkpoint onto the Flax tree of
`model.py`, `keymap.export_params` writes the tree back under these names.
The classification head's rows are the head's own (`ftjax.models.heads`); the
registry appends them.
"""

from ftjax.models.keymap import KeyTable, Rule, dense_rules, norm_rules


def _table(*, prefix: str, layer: str, embeddings: dict, names: dict, pooler: bool,
           ignore: tuple[str, ...]) -> KeyTable:
  """One table from the HF names that differ between the three families."""
  flax_layer = "encoder/layers/{i}"
  rules = [Rule(f"embeddings.{hf}.weight", f"embeddings/{flax}/embedding")
           for flax, hf in embeddings.items()]
  rules += norm_rules("embeddings.LayerNorm", "embeddings/norm")
  for proj in ("query", "key", "value"):
    rules += dense_rules(f"{layer}.{names[proj]}", f"{flax_layer}/attention/{proj}",
                         split_bias=True)
  rules += dense_rules(f"{layer}.{names['output']}", f"{flax_layer}/attention/output", in_dims=2)
  rules += norm_rules(f"{layer}.{names['attention_norm']}", f"{flax_layer}/attention_norm")
  rules += dense_rules(f"{layer}.{names['up']}", f"{flax_layer}/mlp/up")
  rules += dense_rules(f"{layer}.{names['down']}", f"{flax_layer}/mlp/down")
  rules += norm_rules(f"{layer}.{names['mlp_norm']}", f"{flax_layer}/mlp_norm")
  if pooler:
    # Part of the base model, but a checkpoint may lack it (then it is newly
    # initialised) and a classifier that does not read it drops it.
    rules += dense_rules("pooler.dense", "pooler", optional=True)
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
    names=_BERT_LAYER_NAMES, pooler=True,
    # BertForPreTraining / BertForMaskedLM heads.
    ignore=(r"cls[.].*",))

ROBERTA = _table(
    prefix="roberta.", layer="encoder.layer.{i}", embeddings=_BERT_EMBEDDINGS,
    names=_BERT_LAYER_NAMES, pooler=True,
    ignore=(r"lm_head[.].*",))

DISTILBERT = _table(
    prefix="distilbert.", layer="transformer.layer.{i}",
    embeddings=dict(word="word_embeddings", position="position_embeddings"),
    names=dict(query="attention.q_lin", key="attention.k_lin", value="attention.v_lin",
               output="attention.out_lin", attention_norm="sa_layer_norm", up="ffn.lin1",
               down="ffn.lin2", mlp_norm="output_layer_norm"),
    pooler=False,
    ignore=(r"vocab_(transform|layer_norm|projector)[.].*",))

TABLES = {"bert": BERT, "roberta": ROBERTA, "distilbert": DISTILBERT}
