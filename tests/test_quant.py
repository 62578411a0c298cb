"""A quantised frozen base (`ftjax.peft.quant`): NF4/int8 against bitsandbytes, bytes per
parameter, QLoRA exports that PyTorch reloads with ftjax's logits, the partition and a
resumed QLoRA run.

The tiny HF models of tests/hf_models.py have a 37-wide MLP (32 x 37 = 1184
values per kernel), which blocks of 64 do not divide: those tests quantise in
blocks of 32.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import checkpoint, config as config_lib, export, models, optim, train
from ftjax.data import pipeline
from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import keymap
from ftjax.peft import adapter, lora, partition, quant
from tests import hf_models, tiny

TOL = 1e-4
# The NF4 values as the QLoRA paper lists them (appendix E).
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _sample(n=65536, seed=0):
  return (0.02 * np.random.RandomState(seed).randn(n)).astype(np.float32)


def _assert_same_leaves(host, device):
  assert set(host) == set(device)
  for leaf, value in host.items():
    assert isinstance(value, np.ndarray), leaf
    assert value.dtype == np.asarray(device[leaf]).dtype, leaf
    np.testing.assert_array_equal(value, np.asarray(device[leaf]), err_msg=leaf)


def test_nf4_codebook_is_the_papers():
  np.testing.assert_array_equal(quant.NF4_CODE, np.array(PAPER_NF4, np.float32))
  assert len(quant.DYNAMIC_CODE) == 256 and np.all(np.diff(quant.DYNAMIC_CODE) > 0)
  assert quant.DYNAMIC_CODE[0] == -quant.DYNAMIC_CODE[-2] and quant.DYNAMIC_CODE[-1] == 1.0


def test_nf4_error_host_equals_device_and_matches_bitsandbytes():
  """64k normal values in blocks of 64 (QLoRA's double quantisation, 1024 absmax
  constants in 4 blocks of 256): mean |error| is 7.3% of the std.

  bitsandbytes (CPU) gives the same 4-bit codes bit for bit, the same offset and
  the same dequantised values, except where its CPU library rounds an absmax
  constant to the farther of two 8-bit codes (ours is the nearest: its default
  torch backend's rule), and its dynamic map differs from ours by at most one
  float32 ulp (it is built with torch's float32 linspace).
  """
  x = _sample()
  host = quant.quantize_nf4(x, 64, 256)
  _assert_same_leaves(host, quant.quantize_nf4(jnp.asarray(x), 64, 256))
  assert host["nf4_codes"].shape == (1024, 32) and host["nf4_absmax_scale"].shape == (4,)
  assert host["nf4_shape"].shape == (65536, 0)
  restored = np.asarray(quant.dequantize_nf4(host))
  error = np.abs(restored - x).mean() / x.std()
  assert 0.06 < error < 0.075, error

  bnb = pytest.importorskip("bitsandbytes.functional")
  packed, state = bnb.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4",
                                    compress_statistics=True)
  np.testing.assert_array_equal(host["nf4_codes"].reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_allclose(host["nf4_absmax_offset"], state.offset.item(), rtol=1e-6)
  np.testing.assert_array_max_ulp(quant.DYNAMIC_CODE, state.state2.code.numpy(), maxulp=1)
  np.testing.assert_allclose(host["nf4_absmax_scale"], state.state2.absmax.numpy(), rtol=1e-6)
  ours, theirs = host["nf4_absmax"], state.absmax.numpy()
  assert (ours == theirs).mean() > 0.99
  absmax = np.abs(x.reshape(-1, 64)).max(axis=1) - host["nf4_absmax_offset"]
  scale = np.repeat(host["nf4_absmax_scale"], 256)
  for i in np.nonzero(ours != theirs)[0]:
    assert (abs(absmax[i] - quant.DYNAMIC_CODE[ours[i]] * scale[i])
            <= abs(absmax[i] - quant.DYNAMIC_CODE[theirs[i]] * scale[i]))
  theirs_restored = bnb.dequantize_4bit(packed, state).numpy().reshape(-1)
  same = np.repeat(ours == theirs, 64)
  np.testing.assert_allclose(restored[same], theirs_restored[same], rtol=1e-6, atol=1e-9)


def test_int8_is_absmax_per_output_channel():
  """(256, 2, 128) kernel with one input axis: mean |error| 0.6% of the std."""
  x = _sample().reshape(256, 2, 128)
  host = quant.quantize_int8(x, n_in=1)
  _assert_same_leaves(host, quant.quantize_int8(jnp.asarray(x), n_in=1))
  assert host["int8_codes"].dtype == np.int8 and host["int8_scale"].shape == (2, 128)
  np.testing.assert_array_equal(np.abs(host["int8_codes"]).max(axis=0), 127)
  restored = np.asarray(quant.dequantize_int8(host))
  assert np.abs(restored - x).mean() / x.std() < 0.008


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  hf_models.tiny_model("bert", "classification").save_pretrained(root / "bert")
  hf_models.tiny_decoder("llama", "causal_lm").save_pretrained(root / "llama")
  hf_models.tiny_decoder("gpt2", "causal_lm").save_pretrained(root / "gpt2")
  # Wider, for bytes per parameter (kernels of 16k-64k values).
  hf_models.tiny_decoder("llama", "causal_lm", hidden_size=256, intermediate_size=512,
                         num_attention_heads=8).save_pretrained(root / "wide")
  return root


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_bytes_per_parameter(hf_dirs, method):
  """nf4: n/2 bytes of codes + n/64 of absmax codes + 4 per 256 absmax + 4 per kernel
  (0.516 B/param, 0.258x float16); int8: n + 4 per output channel."""
  loaded = models.load_pretrained(str(hf_dirs / "wide"), task="causal_lm",
                                  adapters=(quant.QuantSpec(method),))
  flat = keymap.flatten(loaded.params)
  codes = f"{method}_codes"
  prefixes = [p[:-len(codes)] for p in flat if p.endswith(codes)]
  assert len(prefixes) == 2 * 7 and not any(p.endswith("/kernel") for p in flat
                                              if p.startswith("decoder/layers/"))
  n = quantised = 0
  for prefix in prefixes:
    leaves = {p: x for p, x in flat.items() if p.startswith(prefix) and p.rsplit("/", 1)[-1]
              in quant.LEAVES}
    quantised += sum(x.nbytes for x in leaves.values())
    n += (flat[prefix + codes].size * 2 if method == "nf4" else flat[prefix + codes].size)
  per_param = quantised / n
  print(f"{method}: {quantised} bytes for {n} parameters: {per_param:.4f} B/param, "
        f"{per_param / 2:.4f}x float16, {per_param / 4:.4f}x float32")
  if method == "nf4":
    assert quantised == n // 2 + n // 64 + 4 * len(prefixes) + 4 * sum(
        flat[p + "nf4_absmax_scale"].size for p in prefixes)
    assert abs(per_param / 0.5 - 1) <= 0.05 and per_param / 2 <= 0.27
  else:
    assert abs(per_param - 1) <= 0.05


def _randomize(params, suffix, seed=0, std=0.3):
  flat = dict(keymap.flatten(params))
  rng = np.random.RandomState(seed)
  for path in flat:
    if path.endswith(suffix):
      flat[path] = jnp.asarray(rng.normal(0, std, flat[path].shape), jnp.float32)
  return keymap.unflatten(flat, params)


def _logits(model, params, inputs):
  return np.asarray(model.apply(params, **inputs).logits)


def _outputs(model, params, inputs):
  """(every hidden state, logits): tiny random heads give logits of ~0.02, so the
  hidden states (~1) are where a wrong kernel shows."""
  out = model.apply(params, **inputs)
  return [np.asarray(h) for h in out.hidden_states], np.asarray(out.logits)


def _max_diff(a, b, mask):
  """Max |a - b| over the real (mask == 1) tokens of lists of (batch, seq, ...) arrays (a
  decoder's padded positions are not transformers')."""
  real = mask.astype(bool)
  return max(float(np.abs(x[real] - y[real]).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("model_type,method", [("bert", "nf4"), ("llama", "nf4"),
                                               ("llama", "int8"), ("gpt2", "nf4")])
def test_qlora_export_reloads_in_pytorch_with_the_same_logits(hf_dirs, tmp_path, model_type,
                                                              method):
  task = "classification" if model_type == "bert" else "causal_lm"
  folder = hf_dirs / model_type
  spec = quant.QuantSpec(method, block_size=32)
  loaded = models.load_pretrained(str(folder), task=task, adapters=(spec,))
  model, params = loaded.model, loaded.params
  # The host path (numpy, at load) and the device path (jax.numpy, add_adapters) agree.
  float_model, float_params = models.from_pretrained(str(folder), task=task)
  _, on_device = adapter.add_adapters(float_model, float_params, (spec,), jax.random.key(0))
  for path, value in keymap.flatten(params).items():
    np.testing.assert_array_equal(value, keymap.flatten(on_device)[path], err_msg=path)

  qlora_model, qlora_params = adapter.add_adapters(
      model, params, (lora.LoraSpec(rank=4, alpha=8.0, targets=("all-linear",)),),
      jax.random.key(1))
  assert [a.name for a in qlora_model.adapters] == ["quant", "lora"]
  qlora_params = _randomize(qlora_params, "lora_b")
  config = hf_models.TINY[model_type]() if model_type == "bert" else hf_models.TINY_DECODERS[
      model_type]()
  inputs = hf_models.padded_batch(config)
  ours_hidden, ours = _outputs(qlora_model, qlora_params, inputs)
  quantised_hidden, _ = _outputs(model, params, inputs)
  # Quantising and the adapters each move the outputs well beyond the tolerance.
  mask = inputs["attention_mask"]
  assert _max_diff(quantised_hidden, _outputs(float_model, float_params, inputs)[0],
                   mask) > 10 * TOL
  assert _max_diff(ours_hidden, quantised_hidden, mask) > 10 * TOL

  merged_model, merged = adapter.merge_adapters(qlora_model, qlora_params)
  assert merged_model.adapters == ()
  models.save_pretrained(merged, merged_model.config, tmp_path)
  cls = (transformers.AutoModelForSequenceClassification if task == "classification"
         else transformers.AutoModelForCausalLM)
  reloaded = cls.from_pretrained(tmp_path).eval()
  torch_hidden, torch_logits = hf_models.torch_outputs(reloaded, inputs)
  assert _max_diff(torch_hidden, ours_hidden, mask) < TOL
  assert _max_diff([torch_logits], [ours], mask if task == "causal_lm" else np.ones(3)) < TOL


def test_dora_over_a_quantised_base_starts_as_it(hf_dirs):
  """DoRA's magnitudes are the column norms of the dequantised kernel (the kernel reader)."""
  loaded = models.load_pretrained(str(hf_dirs / "llama"), task="causal_lm",
                                  adapters=(quant.QuantSpec("nf4", block_size=32),))
  dora_model, dora_params = adapter.add_adapters(
      loaded.model, loaded.params, (lora.LoraSpec(rank=4, alpha=8.0, dora=True),),
      jax.random.key(0))
  flat = keymap.flatten(dora_params)
  prefix = "decoder/layers/0/attention/query/"
  kernel = np.asarray(adapter.kernel_value(flat, prefix))
  np.testing.assert_allclose(flat[prefix + "lora_magnitude"],
                             np.linalg.norm(kernel.reshape(32, -1), axis=0).reshape(4, 8),
                             rtol=1e-6)
  inputs = hf_models.padded_batch(hf_models.TINY_DECODERS["llama"]())
  np.testing.assert_allclose(_logits(dora_model, dora_params, inputs),
                             _logits(loaded.model, loaded.params, inputs), atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "nf5"}, "strategy.quant.method='nf5'; expected 'nf4' or 'int8' ('none': no "
                        "quantised base)"),
    ({"method": "none"}, "strategy.quant.method='none'; expected 'nf4' or 'int8'"),
    ({"method": "nf4", "block_size": 33}, "strategy.quant.block_size=33; expected a positive "
                                          "multiple of 2 (QLoRA uses 64)"),
    ({"method": "nf4", "block_size": 0}, "strategy.quant.block_size=0; expected a positive "
                                         "multiple of 2"),
    ({"method": "nf4", "absmax_block": 0}, "strategy.quant.absmax_block=0; expected a "
                                           "positive number"),
])
def test_bad_spec_is_a_one_line_config_error(kwargs, message):
  with pytest.raises(ConfigError, match="^" + re.escape(message)) as e:
    quant.QuantSpec(**kwargs)
  assert "\n" not in str(e.value)


def test_bad_method_in_the_config_and_a_block_that_does_not_divide_a_kernel(hf_dirs):
  c = config_lib.default_config()
  with pytest.raises(ConfigError, match=r"^strategy.quant.method='nf5'"):
    config_lib.validate(config_lib.override(c, {"strategy.quant.method": "nf5"}))
  config = models.config_from_pretrained(str(hf_dirs / "llama"), task="causal_lm")
  with pytest.raises(ConfigError) as e:
    models.Model.build(config, adapters=(quant.QuantSpec("nf4"),))
  assert str(e.value) == (
      "strategy.quant.block_size=64 does not divide kernel 'decoder/layers/0/mlp/down' of 1184 "
      "values (37, 32); expected a block size that divides every quantised kernel (here 32 "
      "would), or targets without it")
  # int8 has no blocks.
  models.Model.build(config, adapters=(quant.QuantSpec("int8"),))
  with pytest.raises(CheckpointError, match="is not a PEFT adapter; export the merged model"):
    quant.QuantSpec("nf4").to_peft(None, {})


def test_partition_freezes_the_codes_even_for_full(hf_dirs):
  config = models.config_from_pretrained(str(hf_dirs / "llama"), task="causal_lm")
  model = models.Model.build(config, adapters=(quant.QuantSpec("nf4", block_size=32),))
  c = config_lib.default_config()
  strategy = config_lib.override(c, {"strategy.quant.method": "nf4",
                                     "strategy.quant.block_size": 32}).strategy
  assert [a.name for a in adapter.from_config(strategy)] == ["quant"]
  labels = partition.labels(list(model.param_axes),
                            partition.strategy_rules(strategy, num_layers=2))
  for path, label in labels.items():
    leaf = path.rsplit("/", 1)[-1]
    assert label == (partition.FROZEN if leaf in quant.LEAVES else partition.TRAINABLE), path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("tiny")
  return (tiny.make_model(root / "model", minilm_dir, num_layers=2),
          tiny.make_data(root / "data", data_dir, sizes=(("train", 64), ("validation", 32))))


QLORA = {"strategy.name": "lora", "strategy.quant.method": "nf4", "strategy.lora.rank": 4,
         "strategy.lora.targets": ("all-linear",), "training.num_steps": 4,
         "checkpoint.every_steps": 2, "eval.every_steps": 4, "eval.splits": ("validation",),
         "training.batch_size": 8, "optimizer.warmup_steps": 0}


def test_qlora_run_trains_the_adapters_only(tiny_dirs):
  model_dir, data_path = tiny_dirs
  run = train.setup(tiny.config(model_dir, data_path, **QLORA), jax.devices()[:1])
  assert [a.name for a in run.model.adapters] == ["quant", "lora"]
  state = run.initial_state
  # Copies: the train step below donates the state's buffers.
  trainable, frozen = ({p: np.array(x) for p, x in keymap.flatten(side).items()}
                       for side in (state.trainable, state.frozen))
  assert all(p.endswith(("lora_a", "lora_b")) or p.startswith("classifier/") for p in trainable)
  codes = [p for p in frozen if p.rsplit("/", 1)[-1] in quant.LEAVES]
  assert len(codes) == 2 * 6 * 5 and not any(p.endswith("/kernel") and "/layers/" in p
                                             for p in frozen)
  # Adam's two moments per trainable value (and a few counters): none for the codes.
  trainable_bytes = sum(x.nbytes for x in trainable.values())
  assert 2 * trainable_bytes <= optim.state_bytes(state.opt_state) <= 2 * trainable_bytes + 64
  # A train step differentiates the trainable side only: the codes (integers) get
  # no gradient and stay as they were; the adapters move.
  train_step, _ = train.compile_steps(run)
  iterator = pipeline.train_iterator(run.train_split, global_batch_size=8, buckets=run.buckets,
                                     seed=0, num_epochs=1, pad_id=run.pad_id)
  after, _ = train_step(state, run.device_batch(run.config.data.train_split, next(iterator)),
                        jax.random.key(0))
  for path, value in keymap.flatten(after.frozen).items():
    np.testing.assert_array_equal(value, frozen[path], err_msg=path)
  assert all(not np.array_equal(value, trainable[path])
             for path, value in keymap.flatten(after.trainable).items() if "lora_b" in path)


def test_qlora_run_resumes_bitwise_and_exports(tiny_dirs, tmp_path):
  model_dir, data_path = tiny_dirs
  config = tiny.config(model_dir, data_path, **QLORA)
  train.train_and_evaluate(config, str(tmp_path / "straight"), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=2,
                           devices=jax.devices()[:1])
  assert not (tmp_path / "resumed" / "results.json").exists()
  train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=jax.devices()[:1])
  finals = [checkpoint.read_trainable(tmp_path / name, 4) for name in ("straight", "resumed")]
  assert set(finals[0]) == set(finals[1])
  assert all(np.abs(v).max() > 0 for p, v in finals[0].items() if p.endswith("lora_b"))
  for path, value in finals[0].items():
    np.testing.assert_array_equal(finals[1][path], value, err_msg=path)
  assert json.loads((tmp_path / "straight" / "results.json").read_text())

  # The exported (merged) run computes the QLoRA model's logits in PyTorch.
  _, model, params, _, _, _ = export.restore_params(tmp_path / "straight")
  export.export(tmp_path / "straight", tmp_path / "merged")
  inputs = hf_models.padded_batch(transformers.BertConfig(vocab_size=1000))
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "merged").eval()
  torch_hidden, torch_logits = hf_models.torch_outputs(reloaded, inputs)
  hidden, logits = _outputs(model, params, inputs)
  assert _max_diff(torch_hidden, hidden, inputs["attention_mask"]) < TOL
  np.testing.assert_allclose(torch_logits, logits, atol=TOL)


def test_rules_that_would_train_the_codes_are_one_line(minilm_dir, data_dir, tmp_path):
  """A user's strategy.rules come first: making a quantised kernel's codes trainable is refused."""
  from ftjax.errors import FtjaxError  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.config(tiny.make_model(tmp_path / "model", minilm_dir, num_layers=1),
                       tiny.make_data(tmp_path / "data", data_dir),
                       **{"strategy.name": "lora", "strategy.quant.method": "int8",
                          "strategy.rules": ((".*/int8_codes", "trainable"),)})
  with pytest.raises(FtjaxError, match=r"^parameter '.*int8_codes' \(int8, a quantised base's "
                     r"codes\) is trainable by the partition rules; expected") as e:
    train.setup(config, jax.devices()[:1])
  assert "\n" not in str(e.value)


def test_a_qlora_model_is_not_exported_as_a_peft_adapter(hf_dirs, tmp_path):
  """Its LoRA was trained on the quantised kernels: only the merged export keeps its logits."""
  from ftjax.peft import hf_adapter, lora  # pylint: disable=g-import-not-at-top
  config = models.config_from_pretrained(str(hf_dirs / "llama"), task="causal_lm")
  model = models.Model.build(config, adapters=(quant.QuantSpec("int8"),
                                               lora.LoraSpec(rank=2, alpha=4.0)))
  with pytest.raises(CheckpointError, match=r"^this model's base is quantised \(quant: int8\), "
                     r"which a PEFT adapter folder cannot hold; export the merged model"):
    hf_adapter.save_adapter(model, model.init(jax.random.key(0)), tmp_path / "adapter")
  assert not (tmp_path / "adapter").exists()
