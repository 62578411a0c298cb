"""The model families ftjax knows, by Hugging Face `model_type`.

A family is a backbone plus the heads of its style (`ftjax.models.heads`):
its key table is the backbone's rows followed by every such head's rows, and
its transformers classes are the family's prefix plus each head's suffix.
Both are read from `heads.HEADS` when asked for, so a head added there is
part of every family of its style.
"""

import dataclasses
from collections.abc import Callable

from flax import nnx

from ftjax.models import heads
from ftjax.models.bert import model as bert_model
from ftjax.models.bert import params as bert_params
from ftjax.models.gpt2 import model as gpt2_model
from ftjax.models.gpt2 import params as gpt2_params
from ftjax.models.keymap import KeyTable
from ftjax.models.llama import model as llama_model
from ftjax.models.llama import params as llama_params

# Tasks whose Hugging Face model is the bare base model: its checkpoint names
# carry no task-model prefix ("bert.", "model.").
BASE_TASKS = heads.BASE_TASKS


@dataclasses.dataclass(frozen=True)
class Family:
  # (HF config dict, task=, num_labels=, dtype=, pooling=) -> the family's frozen config.
  config_from_hf: Callable[..., object]
  module: type[nnx.Module]
  backbone_table: KeyTable
  # How its transformers task models build and name their heads (`heads.ClassifierLayout`).
  head_style: str
  base_task: str  # the task of the bare backbone: "encoder" or "decoder"
  hf_prefix: str  # transformers class names: prefix + "Model", prefix + a head's suffix
  # (task, class) pairs where transformers breaks that pattern.
  hf_classes: tuple[tuple[str, str], ...] = ()

  @property
  def task_heads(self) -> dict[str, type]:
    """task -> head class, for every head of the family's style."""
    return heads.heads_of(self.head_style)

  @property
  def table(self) -> KeyTable:
    """The backbone's rows, then those of every head the family has."""
    rows = tuple(rule for head in self.task_heads.values()
                 for rule in head.rows(self.head_style))
    return dataclasses.replace(self.backbone_table, rules=self.backbone_table.rules + rows)

  @property
  def architectures(self) -> dict[str, str]:
    """task -> the transformers class an export of that task loads as."""
    classes = {self.base_task: f"{self.hf_prefix}Model"}
    classes.update({task: self.hf_prefix + head.HF_SUFFIX
                    for task, head in self.task_heads.items()})
    classes.update(self.hf_classes)
    return classes


def _encoder(model_type: str, hf_prefix: str) -> Family:
  return Family(bert_model.EncoderConfig.from_hf, bert_model.BertFamilyModel,
                bert_params.TABLES[model_type], head_style=model_type, base_task="encoder",
                hf_prefix=hf_prefix)


def _llama(hf_prefix: str) -> Family:
  """Llama, Mistral, Qwen2, Qwen3: one module and one key table, switched by the config."""
  return Family(llama_model.DecoderConfig.from_hf, llama_model.LlamaFamilyModel,
                llama_params.LLAMA, head_style="decoder", base_task="decoder",
                hf_prefix=hf_prefix)


FAMILIES: dict[str, Family] = {
    "bert": _encoder("bert", "Bert"),
    "roberta": _encoder("roberta", "Roberta"),
    "distilbert": _encoder("distilbert", "DistilBert"),
    "llama": _llama("Llama"),
    "mistral": _llama("Mistral"),
    "qwen2": _llama("Qwen2"),
    "qwen3": _llama("Qwen3"),
    "gpt2": Family(gpt2_model.Gpt2Config.from_hf, gpt2_model.Gpt2Model, gpt2_params.GPT2,
                   head_style="decoder", base_task="decoder", hf_prefix="GPT2",
                   hf_classes=(("causal_lm", "GPT2LMHeadModel"),)),
}
