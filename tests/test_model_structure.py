"""Structure every later piece relies on: logical axis names and the key table."""

import jax
import numpy as np
import pytest

from ftjax import models
from ftjax.errors import CheckpointError
from ftjax.models import keymap
from tests import hf_models

KNOWN_AXES = {"vocab", "embed", "embed_out", "positions", "token_types", "heads", "kv", "mlp",
              "labels"}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_every_parameter_has_logical_axes_of_its_rank(model_type, tmp_path):
  hf_models.TINY[model_type]().save_pretrained(tmp_path)
  model = models.Model.build(models.config_from_pretrained(str(tmp_path), task="classification"))
  shapes = keymap.flatten(model.abstract_params)
  assert set(model.param_axes) == set(shapes)
  for path, axes in model.param_axes.items():
    assert len(axes) == len(shapes[path].shape), path
    assert set(axes) <= KNOWN_AXES, (path, axes)
  assert model.param_axes["encoder/layers/0/attention/query/kernel"] == ("embed", "heads", "kv")
  assert model.param_axes["encoder/layers/1/mlp/up/kernel"] == ("embed", "mlp")


@pytest.mark.parametrize("transform, flax_shape", [
    (keymap.IDENTITY, (7, 4)),
    (keymap.FLATTEN, (2, 3)),
    (keymap.LINEAR, (8, 2, 3)),
    (keymap.LINEAR_IN2, (2, 3, 8)),
])
def test_transforms_invert_each_other(transform, flax_shape):
  flax_value = np.random.RandomState(0).randn(*flax_shape).astype(np.float32)
  hf_value = transform.to_hf(flax_value)
  assert hf_value.shape == transform.hf_shape(flax_shape)
  np.testing.assert_array_equal(transform.to_flax(hf_value, flax_shape), flax_value)


def test_linear_transform_matches_pytorch_layout():
  """An HF query weight (out=heads*kv, in=embed) becomes kernel[e, h, d] = W[h*kv + d, e]."""
  w = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)  # heads=2, kv=3, embed=4
  kernel = keymap.LINEAR.to_flax(w, (4, 2, 3))
  assert kernel[1, 1, 2] == w[1 * 3 + 2, 1]


def test_export_refuses_a_parameter_without_a_rule(tmp_path):
  hf_models.TINY["bert"]().save_pretrained(tmp_path)
  model = models.Model.build(models.config_from_pretrained(str(tmp_path), task="encoder"))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.abstract_params)
  params["mystery"] = {"kernel": np.zeros(3)}
  with pytest.raises(CheckpointError, match="'mystery/kernel' has no Hugging Face name"):
    models.save_pretrained(params, model.config, tmp_path / "out")
  assert not (tmp_path / "out" / "model.safetensors").exists()
