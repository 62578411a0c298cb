"""The model families ftjax knows, by Hugging Face `model_type`."""

import dataclasses
from collections.abc import Callable, Mapping

from flax import nnx

from ftjax.models.bert import model as bert_model
from ftjax.models.bert import params as bert_params
from ftjax.models.keymap import KeyTable


@dataclasses.dataclass(frozen=True)
class Family:
  # (HF config dict, task=, num_labels=, dtype=) -> the family's frozen config.
  config_from_hf: Callable[..., object]
  module: type[nnx.Module]
  table: KeyTable
  # task -> the transformers class an export of that task loads as.
  architectures: Mapping[str, str]


FAMILIES: dict[str, Family] = {
    "bert": Family(bert_model.EncoderConfig.from_hf, bert_model.BertFamilyModel,
                   bert_params.BERT,
                   {"encoder": "BertModel", "classification": "BertForSequenceClassification"}),
    "roberta": Family(bert_model.EncoderConfig.from_hf, bert_model.BertFamilyModel,
                      bert_params.ROBERTA,
                      {"encoder": "RobertaModel",
                       "classification": "RobertaForSequenceClassification"}),
    "distilbert": Family(bert_model.EncoderConfig.from_hf, bert_model.BertFamilyModel,
                         bert_params.DISTILBERT,
                         {"encoder": "DistilBertModel",
                          "classification": "DistilBertForSequenceClassification"}),
}
