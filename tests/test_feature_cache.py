"""Head-only training on cached features: same function, computed once, kept on disk."""

import jax
import numpy as np
import pytest

from ftjax import feature_cache, logs, train
from ftjax.errors import ConfigError, FtjaxError
from tests import tiny
from tests.test_train import _steps

HEAD_ONLY = {"strategy.name": "head_only", "eval.splits": ("validation",)}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("tiny_cache")
  return (tiny.make_data(root / "data", data_dir),
          tiny.make_model(root / "model", minilm_dir, dropout=0.1))


def test_cached_features_train_exactly_like_the_encoder(tiny_dirs, tmp_path):
  # Head-only runs its frozen encoder in inference mode (dropout only in the
  # head), so training on cached features is the same function of the same
  # batches, with the same dropout masks: same losses, same head, same eval.
  data_path, model_dir = tiny_dirs
  devices = jax.devices()[:1]
  plain = train.setup(tiny.config(model_dir, data_path, **HEAD_ONLY), devices)
  cached = train.setup(tiny.config(model_dir, data_path, **HEAD_ONLY,
                                   **{"strategy.cache_features": True}), devices,
                       feature_cache_dir=tmp_path)
  assert plain.objective.features is None
  assert set(cached.objective.features) == {"train", "validation"}
  assert cached.objective.features["train"].shape == (len(cached.train_split), 32)
  assert len(list(tmp_path.glob("*.npy"))) == 2

  results = []
  for run in (plain, cached):
    state, losses = _steps(run, 4)
    _, eval_step = train.compile_steps(run)
    results.append((losses, jax.device_get(state.trainable),
                    train.evaluate(run, state, eval_step, "validation")))
  (plain_losses, plain_head, plain_eval), (cached_losses, cached_head, cached_eval) = results
  np.testing.assert_allclose(cached_losses, plain_losses, atol=1e-5)
  assert plain_losses[0] != plain_losses[-1]  # the head did train
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), cached_head, plain_head)
  for key, value in plain_eval.items():
    assert cached_eval[key] == pytest.approx(value, abs=1e-5), key


def test_cache_is_reused_and_keyed_by_what_makes_the_features(tiny_dirs, tmp_path, monkeypatch):
  data_path, model_dir = tiny_dirs
  config = tiny.config(model_dir, data_path, **HEAD_ONLY, **{"strategy.cache_features": True})
  first = train.setup(config, jax.devices()[:1], feature_cache_dir=tmp_path)

  def no_compute(*args, **kwargs):
    raise AssertionError("features were recomputed despite the cache")

  monkeypatch.setattr(feature_cache, "features", no_compute)
  again = train.setup(config, jax.devices()[:1], feature_cache_dir=tmp_path)
  for split, array in first.objective.features.items():
    np.testing.assert_array_equal(again.objective.features[split], array)

  # Another max_length (other token ids) or pooling is another key: a miss.
  for change in ({"data.max_length": 16}, {"model.pooling": "mean"}):
    other = tiny.config(model_dir, data_path, **HEAD_ONLY, **change,
                        **{"strategy.cache_features": True})
    with pytest.raises(AssertionError, match="recomputed"):
      train.setup(other, jax.devices()[:1], feature_cache_dir=tmp_path)


def test_train_and_evaluate_on_cached_features_writes_the_cache(tiny_dirs, tmp_path):
  data_path, model_dir = tiny_dirs
  config = tiny.config(model_dir, data_path, **HEAD_ONLY, **{"strategy.cache_features": True})
  results = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  final_eval = [r for r in logs.read_metrics(tmp_path) if "validation/accuracy" in r][-1]
  assert results["validation/accuracy"] == final_eval["validation/accuracy"]
  n = results["validation/num_examples"]
  assert n == 64 and results["validation/accuracy"] * n == pytest.approx(
      round(results["validation/accuracy"] * n))
  assert len(list((tmp_path / "feature_cache").glob("*.npy"))) == 2
  assert not list((tmp_path / "feature_cache").glob(".*tmp*"))


def test_cache_features_needs_a_frozen_encoder(tiny_dirs):
  data_path, model_dir = tiny_dirs
  with pytest.raises(ConfigError, match="'strategy.cache_features' is True; expected False with "
                                        "strategy.name='full'"):
    tiny.config(model_dir, data_path, **{"strategy.cache_features": True})
  config = tiny.config(model_dir, data_path, **HEAD_ONLY, **{
      "strategy.cache_features": True, "strategy.rules": ((r"pooler/.*", "trainable"),)})
  with pytest.raises(FtjaxError, match="'pooler/bias' is trainable"):
    train.setup(config, jax.devices()[:1])
