"""Real-size architectures built abstractly (jax.eval_shape): counts equal PyTorch's.

PyTorch builds its models on the meta device, so neither side allocates.
"""

import jax
import pytest
import torch
import transformers

from ftjax import models

REAL_SIZES = {
    # name: (HF config, parameters of the bare model as published)
    "bert-base-uncased": (transformers.BertConfig(), 109_482_240),
    "roberta-base": (transformers.RobertaConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        layer_norm_eps=1e-5), 124_645_632),
    "distilbert-base-uncased": (transformers.DistilBertConfig(), 66_362_880),
}


@pytest.mark.parametrize("task", ["encoder", "classification"])
@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_real_size_parameter_count_equals_pytorch(name, task, tmp_path):
  hf_config, published = REAL_SIZES[name]
  cls = (transformers.AutoModelForSequenceClassification if task == "classification"
         else transformers.AutoModel)
  with torch.device("meta"):
    torch_count = sum(p.numel() for p in cls.from_config(hf_config).parameters())
  if task == "encoder":
    assert torch_count == published

  hf_config.save_pretrained(tmp_path)
  config = models.config_from_pretrained(str(tmp_path), task=task)
  model = models.Model.build(config)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(model.abstract_params))
  assert model.num_params() == torch_count
