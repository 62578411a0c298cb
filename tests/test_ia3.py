"""IA3 (`ftjax.peft.ia3`): identity at init, PEFT's math, merge, PEFT interop, training, stacking.

The end-to-end checks use tiny random HF models (tests/hf_models.py) loaded
through `from_pretrained`, and PyTorch PEFT 0.21's `IA3Config` as the
reference for the forward pass and the adapter folder format.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from ftjax import checkpoint, models, optim, train
from ftjax import config as config_lib
from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import keymap
from ftjax.peft import adapter, hf_adapter, ia3, lora, partition
from tests import hf_models, tiny

TOL = 1e-4
FAMILIES = [("bert", "classification"), ("llama", "causal_lm"), ("gpt2", "causal_lm")]


def _torch_model(model_type, task, seed=0):
  if model_type in hf_models.TINY:
    return hf_models.tiny_model(model_type, task, seed)
  return hf_models.tiny_decoder(model_type, task, seed)


@functools.cache
def _base_dir(model_type, task) -> pathlib.Path:
  """A tiny random HF checkpoint, saved once per session."""
  import tempfile  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(tempfile.mkdtemp(prefix=f"ia3-{model_type}-"))
  _torch_model(model_type, task).save_pretrained(folder)
  return folder


def _load(model_type, task):
  model, params = models.from_pretrained(str(_base_dir(model_type, task)), task=task)
  config = hf_models.TINY[model_type]() if model_type in hf_models.TINY else \
      hf_models.TINY_DECODERS[model_type]()
  batch = hf_models.padded_batch(config)
  return model, params, {k: batch[k] for k in ("input_ids", "attention_mask")}


def _logits(model, params, inputs):
  return np.asarray(jax.jit(lambda p: model.apply(p, **inputs).logits)(params))


def _randomize(params, paths, seed=0, std=1.0):
  """Trained-looking values: scales around one, other leaves (a head) redrawn."""
  flat = dict(keymap.flatten(params))
  rng = np.random.RandomState(seed)
  for path in paths:
    center = 1.0 if path.endswith(ia3.SCALE_LEAF) else 0.0
    flat[path] = jnp.asarray(center + rng.normal(0, std, flat[path].shape), jnp.float32)
  return keymap.unflatten(flat, params)


def _scale_paths(params):
  return sorted(p for p in keymap.flatten(params) if p.endswith("/" + ia3.SCALE_LEAF))


@pytest.mark.parametrize("model_type, task", FAMILIES)
def test_fresh_ia3_computes_the_base_model(model_type, task):
  model, params, inputs = _load(model_type, task)
  ia3_model, ia3_params = adapter.add_adapters(model, params, (ia3.IA3Spec(),), jax.random.key(0))
  flat = keymap.flatten(ia3_params)
  scales = _scale_paths(ia3_params)
  stack = "encoder" if model_type == "bert" else "decoder"
  # Key and value (GPT-2: the fused qkv, as PEFT's default c_attn) and the MLP's down-projection.
  projections = ("qkv", "down") if model_type == "gpt2" else ("key", "value", "down")
  assert {p.split("/")[-2] for p in scales} == set(projections)
  assert len(scales) == 2 * len(projections) and all(p.startswith(stack) for p in scales)
  assert set(flat) - set(keymap.flatten(params)) == set(scales)
  for path in scales:
    np.testing.assert_array_equal(flat[path], 1.0)
  # Shapes and logical axes: a key's output axes, the down-projection's input axis.
  axes = ia3_model.param_axes
  down = f"{stack}/layers/0/mlp/down/{ia3.SCALE_LEAF}"
  assert axes[down] == ("mlp",)
  first = f"{stack}/layers/0/attention/{projections[0]}/{ia3.SCALE_LEAF}"
  assert axes[first] == {"bert": ("heads", "kv"), "llama": ("kv_heads", "kv"),
                         "gpt2": ("qkv", "heads", "kv")}[model_type]
  np.testing.assert_array_equal(_logits(ia3_model, ia3_params, inputs),
                                _logits(model, params, inputs))


def test_ia3_layers_compute_peft_s_formula():
  """Output scaling includes the bias (key); input scaling is before the kernel (down)."""
  model, params, _ = _load("bert", "classification")
  ia3_model, ia3_params = adapter.add_adapters(model, params, (ia3.IA3Spec(),), jax.random.key(0))
  ia3_params = _randomize(ia3_params, _scale_paths(ia3_params))
  flat = {p: np.asarray(v) for p, v in keymap.flatten(ia3_params).items()}
  module = nnx.merge(ia3_model.graphdef, ia3_params)
  layer = module.encoder.layers[1]
  assert adapter.mixins(layer.attention.key) == (ia3.IA3Mixin,)
  rng = np.random.RandomState(0)

  x = rng.randn(2, 5, 32).astype(np.float32)
  k = "encoder/layers/1/attention/key/"
  w, b, scale = flat[k + "kernel"].reshape(32, -1), flat[k + "bias"].reshape(-1), flat[
      k + ia3.SCALE_LEAF].reshape(-1)
  expected = (scale * (x @ w + b)).reshape(2, 5, 4, 8)
  np.testing.assert_allclose(np.asarray(layer.attention.key(x)), expected, rtol=1e-5, atol=1e-5)

  h = rng.randn(2, 5, 37).astype(np.float32)
  d = "encoder/layers/1/mlp/down/"
  expected = (h * flat[d + ia3.SCALE_LEAF]) @ flat[d + "kernel"] + flat[d + "bias"]
  np.testing.assert_allclose(np.asarray(layer.mlp.down(h)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type, task", FAMILIES[:2])
def test_merge_gives_the_adapted_function_without_adapter_params(model_type, task):
  model, params, inputs = _load(model_type, task)
  head = [p for p in keymap.flatten(params) if p.startswith("classifier/")]
  params = _randomize(params, head, std=1.0)  # a trained head: logits of a visible size
  ia3_model, ia3_params = adapter.add_adapters(model, params, (ia3.IA3Spec(),), jax.random.key(0))
  ia3_params = _randomize(ia3_params, _scale_paths(ia3_params))
  adapted = _logits(ia3_model, ia3_params, inputs)
  assert np.abs(adapted - _logits(model, params, inputs)).max() > 100 * TOL

  merged_model, merged_params = adapter.merge_adapters(ia3_model, ia3_params)
  assert merged_model.adapters == ()
  assert set(keymap.flatten(merged_params)) == set(keymap.flatten(params))
  np.testing.assert_allclose(_logits(merged_model, merged_params, inputs), adapted, atol=1e-5)
  if model_type == "bert":  # the folds themselves, with biases
    flat, merged = keymap.flatten(ia3_params), keymap.flatten(merged_params)
    k, d = "encoder/layers/0/attention/key/", "encoder/layers/0/mlp/down/"
    np.testing.assert_allclose(merged[k + "kernel"], flat[k + "kernel"] * flat[k + "ia3_scale"],
                               rtol=1e-6)
    np.testing.assert_allclose(merged[k + "bias"], flat[k + "bias"] * flat[k + "ia3_scale"],
                               rtol=1e-6)
    np.testing.assert_allclose(merged[d + "kernel"],
                               flat[d + "kernel"] * flat[d + "ia3_scale"][:, None], rtol=1e-6)
    np.testing.assert_array_equal(merged[d + "bias"], flat[d + "bias"])


@pytest.mark.parametrize("model_type, task", FAMILIES)
def test_exported_adapter_loads_in_peft_with_the_same_logits(model_type, task, tmp_path):
  model, params, inputs = _load(model_type, task)
  head = [p for p in keymap.flatten(params) if p.startswith("classifier/")]
  ia3_model, ia3_params = adapter.add_adapters(model, params, (ia3.IA3Spec(),), jax.random.key(0))
  ia3_params = _randomize(ia3_params, _scale_paths(ia3_params) + head)
  hf_adapter.save_adapter(ia3_model, ia3_params, tmp_path, modules_to_save=tuple(head),
                          base_model_name_or_path=str(_base_dir(model_type, task)))
  config = json.loads((tmp_path / hf_adapter.CONFIG_FILE).read_text())
  assert config["peft_type"] == "IA3"
  assert config["fan_in_fan_out"] == (model_type == "gpt2")
  if model_type == "llama":
    assert (sorted(config["target_modules"]), config["feedforward_modules"]) == (
        ["down_proj", "k_proj", "v_proj"], ["down_proj"])

  ours = _logits(ia3_model, ia3_params, inputs)
  real = inputs["attention_mask"].astype(bool) if task == "causal_lm" else slice(None)
  base_model, base_params, _ = _load(model_type, task)
  assert np.abs(ours - _logits(base_model, base_params, inputs))[real].max() > 100 * TOL
  peft_model = peft.PeftModel.from_pretrained(_torch_model(model_type, task), str(tmp_path)).eval()
  assert isinstance(peft_model.peft_config["default"], peft.IA3Config)
  with torch.no_grad():
    theirs = peft_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  assert np.abs(ours - theirs)[real].max() < TOL

  back_model, back_params = hf_adapter.load_adapter(model, params, tmp_path)
  (spec,) = back_model.adapters
  assert {p.split("/", 3)[-1] for p in spec.feedforward} == {"mlp/down"}
  np.testing.assert_allclose(_logits(back_model, back_params, inputs), ours, atol=1e-6)


@pytest.mark.parametrize("model_type, task", FAMILIES[:2])
def test_a_peft_made_ia3_adapter_imports_with_the_same_logits(model_type, task, tmp_path):
  """PEFT's own default IA3 for the architecture (for BERT that includes the input of
  attention.output.dense, PEFT's "output.dense"), with random ia3_l and head."""
  peft_model = peft.get_peft_model(
      _torch_model(model_type, task),
      peft.IA3Config(task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM"))
  torch.manual_seed(3)
  for name, p in peft_model.named_parameters():
    if "ia3_l" in name or "modules_to_save" in name:
      torch.nn.init.normal_(p, mean=1.0 if "ia3_l" in name else 0.0, std=0.3)
  peft_model.save_pretrained(tmp_path)
  model, params, inputs = _load(model_type, task)
  with torch.no_grad():
    theirs = peft_model.eval()(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  ia3_model, ia3_params = hf_adapter.load_adapter(model, params, tmp_path)
  (spec,) = ia3_model.adapters
  assert isinstance(spec, ia3.IA3Spec)
  feedforward = {p.split("/", 3)[-1] for p in spec.feedforward}
  assert feedforward == ({r"attention/output", r"mlp/down"} if model_type == "bert"
                         else {r"mlp/down"})
  ours = _logits(ia3_model, ia3_params, inputs)
  real = inputs["attention_mask"].astype(bool) if task == "causal_lm" else slice(None)
  assert np.abs(ours - theirs)[real].max() < TOL
  assert np.abs(ours - _logits(model, params, inputs))[real].max() > 100 * TOL


def test_imports_refuse_mismatched_shapes_in_one_line(tmp_path):
  peft_model = peft.get_peft_model(_torch_model("llama", "causal_lm"),
                                   peft.IA3Config(task_type="CAUSAL_LM"))
  peft_model.save_pretrained(tmp_path)
  config = json.loads((tmp_path / hf_adapter.CONFIG_FILE).read_text())
  config["feedforward_modules"] = []  # down_proj's (1, in) ia3_l is then the wrong shape
  (tmp_path / hf_adapter.CONFIG_FILE).write_text(json.dumps(config))
  model, params, _ = _load("llama", "causal_lm")
  with pytest.raises(CheckpointError, match=r"mlp/down' has ia3_l \(1, 37\); the model needs "
                     r"\(32, 1\) \(a non-feedforward module\)$") as e:
    hf_adapter.load_adapter(model, params, tmp_path)
  assert "\n" not in str(e.value)


def _tiny_config():
  return models.FAMILIES["bert"].config_from_hf(
      hf_models.TINY["bert"]().to_dict(), task="classification", num_labels=3, dtype="float32")


@pytest.mark.parametrize("kwargs, message", [
    (dict(feedforward=(r".*/attention/output",)),
     r"^IA3 feedforward target '\.\*/attention/output' matches 'encoder/layers/0/attention/"
     r"output', which no IA3 target matches; expected feedforward targets to be a subset"),
    (dict(targets=(r".*/attention/value",)),
     r"^IA3 feedforward target '\.\*/mlp/down' matches 'encoder/layers/0/mlp/down', which no"),
    (dict(feedforward=(r".*/mlp/downn",)),
     r"^IA3 feedforward target '\.\*/mlp/downn' matches none of the targeted layers"),
    (dict(targets=(r".*/attention/kee", r".*/mlp/down")),
     r"^IA3 target '\.\*/attention/kee' matches no dense layer"),
])
def test_bad_targets_are_one_line_config_errors(kwargs, message):
  with pytest.raises(ConfigError, match=message) as e:
    models.Model.build(_tiny_config(), adapters=(ia3.IA3Spec(**kwargs),))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets=()), r"^IA3 targets are empty; expected at least one module-path regex$"),
    (dict(targets=("(",)), r"^IA3 target '\(' is not a valid regex"),
    (dict(feedforward=("[",)), r"^IA3 feedforward target '\[' is not a valid regex"),
])
def test_bad_specs_are_one_line_config_errors(kwargs, message):
  with pytest.raises(ConfigError, match=message) as e:
    ia3.IA3Spec(**kwargs)
  assert "\n" not in str(e.value)


def test_stacks_with_lora_on_the_same_layers_and_merges_exactly():
  """LoRA on key/value wrapped by IA3 (strategy.name=lora, adapters=("ia3",)), and
  the other order: both adapters' parameters kept, merge = the adapted function."""
  model, params, inputs = _load("bert", "classification")
  strategy = config_lib.default_config().strategy
  strategy.name, strategy.lora.targets = "lora", (r".*/attention/(key|value)",)
  for order in (("ia3",), ("ia3", "lora")):
    strategy.adapters = order
    adapters = adapter.from_config(strategy)
    assert [a.name for a in adapters] == (["lora", "ia3"] if order == ("ia3",) else list(order))
    stacked, stacked_params = adapter.add_adapters(model, params, adapters, jax.random.key(1))
    key = "encoder/layers/0/attention/key/"
    flat = keymap.flatten(stacked_params)
    assert {key + leaf for leaf in ("kernel", "bias", "lora_a", "lora_b", "ia3_scale")} <= set(flat)
    labels = partition.labels(list(flat), partition.strategy_rules(strategy, num_layers=2))
    assert {p for p, lab in labels.items() if lab == partition.TRAINABLE} == (
        set(lora.lora_paths(stacked_params)) | set(_scale_paths(stacked_params))
        | {p for p in flat if p.startswith("classifier/")})
    np.testing.assert_allclose(_logits(stacked, stacked_params, inputs),
                               _logits(model, params, inputs), atol=1e-6)
    trained = _randomize(stacked_params, _scale_paths(stacked_params) + [
        p for p in lora.lora_paths(stacked_params) if p.endswith("lora_b")])
    adapted = _logits(stacked, trained, inputs)
    merged_model, merged_params = adapter.merge_adapters(stacked, trained)
    assert merged_model.adapters == ()
    np.testing.assert_allclose(_logits(merged_model, merged_params, inputs), adapted, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("tiny")
  return (tiny.make_model(root / "model", minilm_dir, num_layers=2),
          tiny.make_data(root / "data", data_dir))


def test_training_trains_scales_and_head_only_and_resumes_bitwise(tiny_dirs, tmp_path):
  model_dir, data_path = tiny_dirs
  config = tiny.config(model_dir, data_path, **{
      "strategy.name": "ia3", "checkpoint.every_steps": 3, "eval.splits": ("validation",)})
  assert config.strategy.ia3.targets == ia3.DEFAULT_TARGETS
  run = train.setup(config, jax.devices()[:1])
  trainable = set(keymap.flatten(run.initial_state.trainable))
  assert trainable == {f"encoder/layers/{i}/{m}/ia3_scale" for i in range(2)
                       for m in ("attention/key", "attention/value", "mlp/down")} | {
                           "classifier/out/kernel", "classifier/out/bias"}
  # Adam's moments exist for exactly those leaves.
  moments = [keymap.flatten(s.mu) for s in jax.tree.leaves(
      run.initial_state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
  assert len(moments) == 1 and set(moments[0]) == trainable
  assert optim.state_bytes(run.initial_state.opt_state) < 4 * 1024

  train.train_and_evaluate(config, str(tmp_path / "straight"), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3,
                           devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=jax.devices()[:1])
  straight, resumed = (checkpoint.read_trainable(tmp_path / name, 6)
                       for name in ("straight", "resumed"))
  assert straight.keys() == resumed.keys()
  for path, value in straight.items():
    np.testing.assert_array_equal(resumed[path], value, err_msg=path)
  scales = [v for p, v in straight.items() if p.endswith(ia3.SCALE_LEAF)]
  assert len(scales) == 6 and all(np.abs(v - 1.0).max() > 0 for v in scales)  # trained
