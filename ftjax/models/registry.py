"""The model families ftjax knows, by Hugging Face `model_type`."""

import dataclasses
from collections.abc import Callable, Mapping

from flax import nnx

from ftjax.models.bert import model as bert_model
from ftjax.models.bert import params as bert_params
from ftjax.models.gpt2 import model as gpt2_model
from ftjax.models.gpt2 import params as gpt2_params
from ftjax.models.keymap import KeyTable
from ftjax.models.llama import model as llama_model
from ftjax.models.llama import params as llama_params

# Tasks whose Hugging Face model is the bare base model: its checkpoint names
# carry no task-model prefix ("bert.", "model.").
BASE_TASKS = ("encoder", "decoder")


@dataclasses.dataclass(frozen=True)
class Family:
  # (HF config dict, task=, num_labels=, dtype=, pooling=) -> the family's frozen config.
  config_from_hf: Callable[..., object]
  module: type[nnx.Module]
  table: KeyTable
  # task -> the transformers class an export of that task loads as.
  architectures: Mapping[str, str]


def _llama_family(prefix: str) -> Family:
  """Llama, Mistral, Qwen2, Qwen3: one module and one key table, switched by the config."""
  return Family(llama_model.DecoderConfig.from_hf, llama_model.LlamaFamilyModel,
                llama_params.LLAMA,
                {"decoder": f"{prefix}Model", "causal_lm": f"{prefix}ForCausalLM",
                 "classification": f"{prefix}ForSequenceClassification"})


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
    "llama": _llama_family("Llama"),
    "mistral": _llama_family("Mistral"),
    "qwen2": _llama_family("Qwen2"),
    "qwen3": _llama_family("Qwen3"),
    "gpt2": Family(gpt2_model.Gpt2Config.from_hf, gpt2_model.Gpt2Model, gpt2_params.GPT2,
                   {"decoder": "GPT2Model", "causal_lm": "GPT2LMHeadModel",
                    "classification": "GPT2ForSequenceClassification"}),
}

