"""Data, FSDP and tensor parallelism on 8 fake CPU devices (tests/conftest.py).

A 1-layer BERT whose sharded dimensions 8 devices divide (embed 64, 8 heads,
mlp 128; only the 30522-row vocabulary is not a multiple of 2 and stays
whole along that axis) so every rule of `config.mesh.rules` really shards:
  - FSDP holds 1/8 of the parameters and Adam moments on each device;
  - tensor parallel and FSDP + tensor parallel train like data parallel
    (losses within 1e-5): sharding changes where values live and the order
    of some sums, not what is computed.
"""

import jax
import numpy as np
import pytest

from ftjax import logs, models, optim, sharding, train
from ftjax.models import keymap
from tests import tiny, tiny_bert

EMBED, HEADS, MLP = 64, 8, 128
RUN = {"training.num_steps": 3, "eval.splits": (), "data.num_buckets": 1}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("parallel")
  # Dropout on: its random bits must not depend on how activations are sharded.
  # One layer: each mesh compiles its own train step, and compiling dominates.
  return (tiny_bert.make_model(root / "model", minilm_dir, hidden_size=EMBED, num_layers=1,
                               num_heads=HEADS, intermediate_size=MLP, dropout=0.1),
          tiny_bert.make_data(root / "data", data_dir))


def _config(tiny_dirs, mesh: dict):
  model_dir, data_path = tiny_dirs
  return tiny.config(model_dir, data_path, **RUN, **mesh)


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of `tree` (device 0; every device holds the same amount)."""
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def test_fsdp_holds_an_eighth_of_params_and_optimizer_state_per_device(tiny_dirs):
  per_device = {}
  for name, mesh in (("data", {"mesh.data": 8}), ("fsdp", {"mesh.data": 1, "mesh.fsdp": 8})):
    state = train.setup(_config(tiny_dirs, mesh)).initial_state
    params = {"trainable": state.trainable, "frozen": state.frozen}
    per_device[name] = {"params": _per_device_bytes(params),
                        "opt_state": _per_device_bytes(state.opt_state)}
    total_params = sum(x.nbytes for x in jax.tree.leaves(params))
    total_opt = optim.state_bytes(state.opt_state)
  # Data parallel replicates everything: each device holds the whole model and both moments.
  assert per_device["data"] == {"params": total_params, "opt_state": total_opt}
  # FSDP splits every leaf with an `embed` axis (kernels, embeddings, norms) 8 ways; what
  # stays whole is tiny: attention and MLP biases (axes heads/mlp, which map to the
  # size-1 tensor axis), the classifier bias and Adam's step counters. Hence a bit under 8x.
  for part in ("params", "opt_state"):
    ratio = per_device["data"][part] / per_device["fsdp"][part]
    assert 7.5 < ratio <= 8, (part, ratio, per_device)
  # Adam: two moments per trainable value, on the device that holds the value.
  assert 2 * per_device["fsdp"]["params"] <= per_device["fsdp"]["opt_state"] < (
      2 * per_device["fsdp"]["params"] + 256)


def _losses(workdir):
  return [r["train/loss"] for r in logs.read_metrics(workdir) if "train/loss" in r]


@pytest.fixture(scope="module")
def data_parallel_losses(tiny_dirs, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("data_parallel")
  train.train_and_evaluate(_config(tiny_dirs, {"mesh.data": 8}), str(workdir))
  return _losses(workdir)


def _case(mesh: dict, query_shard: tuple, up_shard: tuple):
  return pytest.param(mesh, query_shard, up_shard,
                      id=",".join(f"{k.removeprefix('mesh.')}={n}" for k, n in mesh.items()))


@pytest.mark.parametrize("mesh, query_shard, up_shard", [
    # (embed, heads, kv) and (embed, mlp) kernels: heads and mlp split over `tensor`.
    _case({"mesh.data": 1, "mesh.tensor": 8}, (EMBED, HEADS // 8, 8), (EMBED, MLP // 8)),
    # FSDP + TP: embed over `fsdp` as well; then all three axes.
    _case({"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4}, (EMBED // 2, HEADS // 4, 8),
          (EMBED // 2, MLP // 4)),
    _case({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, (EMBED // 2, HEADS // 2, 8),
          (EMBED // 2, MLP // 2)),
])
def test_tensor_and_fsdp_parallel_train_like_data_parallel(tiny_dirs, tmp_path, mesh,
                                                           query_shard, up_shard,
                                                           data_parallel_losses):
  config = _config(tiny_dirs, mesh)
  # It really is sharded so: each device's block of the kernels (what train.setup places).
  model = models.Model.build(models.config_from_pretrained(
      config.model.name_or_path, task="classification", num_labels=2))
  shardings = keymap.flatten(sharding.param_shardings(
      config, sharding.make_mesh(config), model.abstract_params, model.param_axes))
  shapes = keymap.flatten(model.abstract_params)
  for path, shard in (("encoder/layers/0/attention/query/kernel", query_shard),
                      ("encoder/layers/0/mlp/up/kernel", up_shard)):
    assert shardings[path].shard_shape(shapes[path].shape) == shard, path

  train.train_and_evaluate(config, str(tmp_path))
  assert len(data_parallel_losses) == RUN["training.num_steps"]
  np.testing.assert_allclose(_losses(tmp_path), data_parallel_losses, atol=1e-5)
