"""Prompt tuning and prefix tuning (`ftjax.peft.prompt`): PEFT interop, the KV cache, runs.

Parity: a tiny random HF model is loaded by ftjax, a prompt or prefix with
random (trained-looking) values is added and exported as a PEFT folder;
`peft.PeftModel.from_pretrained` on the transformers model must give ftjax's
logits (real tokens of a right-padded batch), and `hf_adapter.load_adapter`
must rebuild the same ftjax model. Adapters PEFT itself made import back with
PEFT's logits. Then: the KV cache against one full pass, a projection folded
into plain prefixes, PEFT's text init, bad values in one line, and training
through the run machinery (only the virtual tokens and the head change; a
resumed run ends bitwise equal).
"""

import json

import jax
import ml_collections
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from ftjax import checkpoint, config as config_lib, generate, models, optim, train
from ftjax.core import run as run_lib
from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import keymap, layers
from ftjax.peft import adapter, hf_adapter, partition, prompt
from tests import hf_models, tiny

TOL = 1e-4
CACHE_TOL = 1e-5
VIRTUAL = 5


def _torch_model(model_type, task):
  if model_type in hf_models.TINY:
    return hf_models.tiny_model(model_type, task)
  return hf_models.tiny_decoder(model_type, task)


def _base(model_type, task, tmp_path):
  """(ftjax model, params with a random head) of a saved tiny HF model."""
  _torch_model(model_type, task).save_pretrained(tmp_path / "base")
  model, params = models.from_pretrained(str(tmp_path / "base"), task=task)
  flat = dict(keymap.flatten(params))
  for i, path in enumerate(p for p in flat if p.startswith("classifier/")):
    flat[path] = jax.random.normal(jax.random.key(10 + i), flat[path].shape)
  return model, keymap.unflatten(flat, params)


def _inputs(model_type, task):
  batch = hf_models.padded_batch(_torch_model(model_type, task).config)
  return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _logits(model, params, inputs):
  return np.asarray(jax.jit(model.apply)(params, *inputs.values()).logits)


def _max_diff(ours, theirs, inputs, task):
  if task == "causal_lm":  # real tokens only; PEFT's prompt tuning adds the virtual ones' logits
    real = inputs["attention_mask"].astype(bool)
    return float(np.abs(ours - theirs[:, -ours.shape[1]:])[real].max())
  return float(np.abs(ours - theirs).max())


EXPORTS = [
    ("bert", "classification", prompt.PromptSpec(num_virtual_tokens=VIRTUAL)),
    ("roberta", "classification", prompt.PromptSpec(num_virtual_tokens=VIRTUAL)),
    ("llama", "causal_lm", prompt.PromptSpec(num_virtual_tokens=VIRTUAL)),
    ("llama", "causal_lm", prompt.PrefixSpec(num_virtual_tokens=VIRTUAL)),
    ("qwen3", "causal_lm", prompt.PrefixSpec(num_virtual_tokens=VIRTUAL, projection=True,
                                             projection_size=16)),
    ("gpt2", "causal_lm", prompt.PromptSpec(num_virtual_tokens=VIRTUAL)),
    ("gpt2", "causal_lm", prompt.PrefixSpec(num_virtual_tokens=VIRTUAL)),
]


@pytest.mark.parametrize("model_type, task, spec", EXPORTS,
                         ids=[f"{m}-{s.name}{'-proj' * getattr(s, 'projection', False)}"
                              for m, _, s in EXPORTS])
def test_export_loads_in_peft_with_our_logits_and_imports_back(model_type, task, spec,
                                                                tmp_path):
  model, params = _base(model_type, task, tmp_path)
  tuned, tuned_params = adapter.add_adapters(model, params, (spec,), jax.random.key(1))
  head = tuple(p for p in keymap.flatten(params) if p.startswith("classifier/"))
  hf_adapter.save_adapter(tuned, tuned_params, tmp_path / "adapter",
                          base_model_name_or_path=str(tmp_path / "base"), modules_to_save=head)
  config = json.loads((tmp_path / "adapter" / hf_adapter.CONFIG_FILE).read_text())
  assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[spec.name]
  assert config["num_virtual_tokens"] == VIRTUAL and config["inference_mode"]
  names = set(load_file(tmp_path / "adapter" / hf_adapter.WEIGHTS_FILE))
  # PEFT's prompt-learning layout: its tensor at the top, the head under base_model.
  assert "prompt_embeddings" in names and len(names) == 1 + len(head)
  assert all(n.startswith("base_model.classifier.") for n in names - {"prompt_embeddings"})

  inputs = _inputs(model_type, task)
  ours = _logits(tuned, tuned_params, inputs)
  assert _max_diff(ours, _logits(model, params, inputs), inputs, task) > 100 * TOL

  peft_model = peft.PeftModel.from_pretrained(_torch_model(model_type, task),
                                              str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = peft_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  assert _max_diff(ours, theirs, inputs, task) < TOL

  back, back_params = hf_adapter.load_adapter(model, params, tmp_path / "adapter")
  (back_spec,) = back.adapters
  assert type(back_spec) is type(spec) and back_spec.num_virtual_tokens == VIRTUAL
  assert not getattr(back_spec, "projection", False)  # PEFT holds the computed prefixes
  np.testing.assert_allclose(_logits(back, back_params, inputs), ours, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("projection", [False, True])
def test_encoder_prefix_equals_transformers_under_peft_s_prefix(model_type, projection,
                                                                 tmp_path):
  """PEFT's SEQ_CLS forward refuses encoders on transformers 5 (its check looks for a
  `past_key_values` argument, which BertModel now calls `cache`), so the
  reference is what that forward computes: the encoder with PEFT's prefix cache
  (`get_prompt`) and the attention mask extended by ones, then the classifier."""
  spec = prompt.PrefixSpec(num_virtual_tokens=VIRTUAL, projection=projection,
                           projection_size=16)
  model, params = _base(model_type, "classification", tmp_path)
  tuned, tuned_params = adapter.add_adapters(model, params, (spec,), jax.random.key(1))
  hf_adapter.save_adapter(tuned, tuned_params, tmp_path / "adapter")  # the head goes along
  batch = hf_models.padded_batch(_torch_model(model_type, "classification").config)
  ours = np.asarray(jax.jit(tuned.apply)(tuned_params, **batch).logits)

  peft_model = peft.PeftModel.from_pretrained(_torch_model(model_type, "classification"),
                                              str(tmp_path / "adapter")).eval()
  pt = {k: torch.tensor(v) for k, v in batch.items()}
  mask = torch.cat([torch.ones(3, VIRTUAL, dtype=pt["attention_mask"].dtype),
                    pt["attention_mask"]], dim=1)
  with torch.no_grad():
    encoded = getattr(peft_model.base_model, model_type)(
        input_ids=pt["input_ids"], attention_mask=mask, token_type_ids=pt.get("token_type_ids"),
        cache=peft_model.get_prompt(3))
    theirs = peft_model.base_model.classifier(
        encoded.pooler_output if model_type == "bert" else encoded.last_hidden_state).numpy()
  assert np.abs(ours - theirs).max() < TOL


PEFT_MADE = [
    ("bert", "classification", peft.PromptTuningConfig(task_type="SEQ_CLS",
                                                       num_virtual_tokens=VIRTUAL)),
    ("llama", "causal_lm", peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                   num_virtual_tokens=VIRTUAL)),
    ("llama", "causal_lm", peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                   num_virtual_tokens=VIRTUAL,
                                                   prefix_projection=True,
                                                   encoder_hidden_size=16)),
]


@pytest.mark.parametrize("model_type, task, peft_config", PEFT_MADE,
                         ids=["bert-prompt", "llama-prompt", "llama-prefix-proj"])
def test_importing_adapters_peft_made(model_type, task, peft_config, tmp_path):
  _torch_model(model_type, task).save_pretrained(tmp_path / "base")
  peft_model = peft.get_peft_model(_torch_model(model_type, task), peft_config)
  torch.manual_seed(3)
  for name, p in peft_model.named_parameters():
    if p.requires_grad:  # trained-looking values (and a trained classifier)
      torch.nn.init.normal_(p, std=0.5)
  peft_model.save_pretrained(tmp_path / "adapter")
  inputs = _inputs(model_type, task)
  with torch.no_grad():
    theirs = peft_model.eval()(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
  model, params = models.from_pretrained(str(tmp_path / "base"), task=task)
  tuned, tuned_params = hf_adapter.load_adapter(model, params, tmp_path / "adapter")
  assert _max_diff(_logits(tuned, tuned_params, inputs), theirs, inputs, task) < TOL


def test_a_projection_folds_into_plain_prefixes_and_nothing_merges(tmp_path):
  model, params = _base("bert", "classification", tmp_path)
  spec = prompt.PrefixSpec(num_virtual_tokens=VIRTUAL, projection=True, projection_size=8)
  tuned, tuned_params = adapter.add_adapters(model, params, (spec,), jax.random.key(1))
  paths = adapter.adapter_paths(tuned)
  assert {"prefix/embedding", "prefix/dense/kernel",
          "encoder/layers/1/attention/prefix/value/kernel"} <= set(paths)
  assert tuned.param_axes["encoder/layers/0/attention/prefix/key/kernel"] == (
      prompt.PREFIX_MLP_AXIS, "heads", "kv")
  folded, folded_params = prompt.fold_projection(tuned, tuned_params)
  assert folded.adapters == (prompt.PrefixSpec(num_virtual_tokens=VIRTUAL, projection=False,
                                               projection_size=8),)
  assert sorted(adapter.adapter_paths(folded)) == sorted(
      f"encoder/layers/{i}/attention/prefix/{kind}" for i in range(2)
      for kind in ("key", "value"))
  assert folded.param_axes["encoder/layers/0/attention/prefix/key"] == (
      prompt.VIRTUAL_AXIS, "heads", "kv")
  inputs = _inputs("bert", "classification")
  np.testing.assert_allclose(_logits(folded, folded_params, inputs),
                             _logits(tuned, tuned_params, inputs), atol=1e-5)
  for tuned_model in (tuned, adapter.add_adapters(model, params, (prompt.PromptSpec(3),),
                                                  jax.random.key(0))[0]):
    name = tuned_model.adapters[0].name
    with pytest.raises(ConfigError, match=f"^{name} tuning adds virtual tokens, which cannot "
                                          f"be merged.*--format=peft\\)$"):
      adapter.merge_adapters(tuned_model, tuned_params)


KV_CACHE = [
    ("llama", (prompt.PromptSpec(num_virtual_tokens=3),)),
    ("llama", (prompt.PrefixSpec(num_virtual_tokens=4, projection=True, projection_size=8),)),
    ("mistral", (prompt.PrefixSpec(num_virtual_tokens=4),)),  # a sliding window of 4
    ("gpt2", (prompt.PrefixSpec(num_virtual_tokens=4), prompt.PromptSpec(num_virtual_tokens=3))),
]


@pytest.mark.parametrize("model_type, specs", KV_CACHE,
                         ids=[f"{m}-{'+'.join(s.name for s in specs)}" for m, specs in KV_CACHE])
def test_kv_cache_decode_equals_full_forward(model_type, specs, tmp_path):
  """Prefill a left-padded prompt, then decode token by token: the logits of one pass."""
  model, params = _base(model_type, "causal_lm", tmp_path)
  model, params = adapter.add_adapters(model, params, specs, jax.random.key(1))
  virtual = sum(s.num_virtual_tokens for s in specs)
  config = _torch_model(model_type, "causal_lm").config
  prompt_len, new = 6, 5
  full = hf_models.left_padded_batch(config, seq=prompt_len + new)
  mask = np.concatenate([hf_models.left_padded_batch(config, seq=prompt_len)["attention_mask"],
                         np.ones((3, new), np.int32)], axis=1)
  ids = np.where(mask == 1, full["input_ids"], 0)
  apply = jax.jit(model.apply)
  reference = np.asarray(apply(params, ids, mask).logits)
  assert reference.shape == (3, prompt_len + new, config.vocab_size)

  cache = model.apply(params, 3, prompt_len + new, method="init_cache")
  assert int(cache.index) == virtual and bool(cache.mask[:, :virtual].all())
  out = apply(params, ids[:, :prompt_len], mask[:, :prompt_len], cache=cache)
  real = mask[:, :prompt_len].astype(bool)
  assert np.abs(np.asarray(out.logits) - reference[:, :prompt_len])[real].max() < CACHE_TOL
  cache = out.cache
  for step in range(prompt_len, prompt_len + new):
    out = apply(params, ids[:, step:step + 1], mask[:, step:step + 1], cache=cache)
    assert np.abs(np.asarray(out.logits)[:, 0] - reference[:, step]).max() < CACHE_TOL
    cache = out.cache
  assert int(cache.index) == virtual + prompt_len + new

  # generate's greedy tokens are the full forward's argmax, one token at a time (a sliding
  # window counts slots, so left padding would move it: prompts of one length there).
  prompts = [[5, 6, 7], [8, 9] if model_type != "mistral" else [8, 9, 10]]
  tokens = generate.generate(model, params, prompts, max_new_tokens=3, eos_token_id=()).tokens
  for row, row_prompt in enumerate(prompts):
    sequence = list(row_prompt)
    for _ in range(3):
      logits = apply(params, np.asarray([sequence]), np.ones((1, len(sequence)), int)).logits
      sequence.append(int(np.argmax(logits[0, -1])))
    assert tokens[row] == sequence[len(row_prompt):]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_packed_segments_each_see_the_virtual_tokens(model_type, tmp_path):
  """A packed row equals its sequences run apart: every segment sees the prompt and the
  prefix, and its positions start after them."""
  model, params = _base(model_type, "causal_lm", tmp_path)
  model, params = adapter.add_adapters(
      model, params, (prompt.PrefixSpec(num_virtual_tokens=2),
                      prompt.PromptSpec(num_virtual_tokens=3)), jax.random.key(1))
  rng = np.random.RandomState(0)
  first, second = rng.randint(3, 99, size=(1, 5)), rng.randint(3, 99, size=(1, 4))
  packed = np.concatenate([first, second, np.zeros((1, 2), int)], axis=1)
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 2])
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0]])
  apply = jax.jit(model.apply)
  separate = [np.asarray(apply(params, x).logits)[0] for x in (first, second)]
  for kwargs in ({}, {"positions_bt": positions}):
    logits = np.asarray(apply(params, packed, segment_ids_bt=segments, **kwargs).logits)[0]
    assert logits.shape == (11, 99)
    assert np.abs(logits[:5] - separate[0]).max() < CACHE_TOL
    assert np.abs(logits[5:9] - separate[1]).max() < CACHE_TOL


def test_scanned_and_rematerialised_layers_compute_the_same(tmp_path):
  model, params = _base("bert", "classification", tmp_path)
  model, params = adapter.add_adapters(
      model, params, (prompt.PrefixSpec(VIRTUAL, projection=True, projection_size=8),
                      prompt.PromptSpec(3)), jax.random.key(1))
  scanned = model.with_execution(layers.Execution(remat="full", scan_groups=((0, 2),)))
  inputs = _inputs("bert", "classification")
  grads = [jax.jit(jax.grad(lambda p, m=m: m.apply(p, *inputs.values()).logits.sum()))(params)
           for m in (model, scanned)]
  for path, grad in keymap.flatten(grads[0]).items():
    np.testing.assert_allclose(keymap.flatten(grads[1])[path], grad, atol=1e-5, err_msg=path)


def test_virtual_tokens_stay_out_of_the_outputs_but_the_cls_head_reads_the_first(tmp_path):
  model, params = _base("bert", "classification", tmp_path)
  tuned, tuned_params = adapter.add_adapters(model, params, (prompt.PromptSpec(VIRTUAL),),
                                             jax.random.key(1))
  inputs = _inputs("bert", "classification")
  out = tuned.apply(tuned_params, *inputs.values())
  assert out.last_hidden_state.shape == (3, 11, 32)
  assert all(h.shape == (3, 11, 32) for h in out.hidden_states)
  backbone = tuned.apply(tuned_params, *inputs.values(), method="backbone")
  assert backbone.virtual_states.shape == (3, VIRTUAL, 32)
  features = tuned.apply(tuned_params, *inputs.values(), method="features")
  flat = keymap.flatten(tuned_params)
  np.testing.assert_allclose(features, np.tanh(
      backbone.virtual_states[:, 0] @ flat["pooler/kernel"] + flat["pooler/bias"]), atol=1e-5)


@pytest.mark.parametrize("text", ["great", "a long sentence of many tokens, more than five"])
def test_init_text_gives_peft_s_initial_prompt(text, tmp_path, minilm_dir):
  folder = tiny.make_model(tmp_path / "model", minilm_dir, num_layers=1)
  model, params = models.from_pretrained(str(folder))
  tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(folder)
  spec = prompt.PromptSpec(num_virtual_tokens=VIRTUAL, init_text=text).bind(tokenizer)
  _, tuned_params = adapter.add_adapters(model, params, (spec,), jax.random.key(0))
  theirs = peft.get_peft_model(
      __import__("transformers").BertModel.from_pretrained(folder),
      peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=VIRTUAL,
                              prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                              tokenizer_name_or_path=str(folder)))
  expected = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(tuned_params["prompt"]["embedding"]), expected)


def _strategy(**values):
  c = config_lib.default_config()
  c.model.name_or_path = "x"
  c.data.path = "x"
  return config_lib.override(c, values)


@pytest.mark.parametrize("values, message", [
    ({"strategy.name": "prompt", "strategy.prompt.num_virtual_tokens": 0},
     "config key 'strategy.prompt.num_virtual_tokens' is 0; expected at least 1 virtual token"),
    ({"strategy.name": "prefix", "strategy.prefix.num_virtual_tokens": -3},
     "config key 'strategy.prefix.num_virtual_tokens' is -3; expected at least 1 virtual token"),
    ({"strategy.name": "prefix", "strategy.prefix.projection": True,
      "strategy.prefix.projection_size": 0},
     "config key 'strategy.prefix.projection_size' is 0; expected a hidden size >= 1 for the "
     "prefix projection"),
])
def test_bad_values_are_one_line_config_errors(values, message):
  with pytest.raises(ConfigError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(_strategy(**values))


def test_virtual_tokens_must_fit_the_learned_positions(tmp_path):
  model, params = _base("gpt2", "causal_lm", tmp_path)  # 64 positions
  tuned, tuned_params = adapter.add_adapters(model, params, (prompt.PrefixSpec(VIRTUAL),),
                                             jax.random.key(0))
  config = _strategy(**{"strategy.name": "prefix", "strategy.prefix.num_virtual_tokens": VIRTUAL,
                        "data.max_length": 60, "model.name_or_path": "tiny-gpt2"})
  with pytest.raises(ConfigError, match=r"^data.max_length=60 \+ strategy.prefix.num_virtual_"
                                        r"tokens=5 exceed the 64 positions of tiny-gpt2; "
                                        r"expected data.max_length <= 59 \(or fewer virtual "
                                        r"tokens\)$"):
    run_lib._fit_to_positions(config, tuned)  # pylint: disable=protected-access
  config.data.max_length = 59
  assert run_lib._fit_to_positions(config, tuned) is config  # pylint: disable=protected-access
  with pytest.raises(ConfigError, match="57 prompt \\+ 3 new tokens after 5 virtual tokens "
                                        "exceed the model's 64 learned positions"):
    generate.generate(tuned, tuned_params, [[5] * 57], max_new_tokens=3)


def test_a_family_without_the_hooks_and_formats_peft_lacks_are_refused(tmp_path):
  class Bare(nnx.Module):  # a family whose backbone has no virtual-token hooks
    config = ml_collections.ConfigDict({"model_type": "vit", "hidden_size": 8})

  for spec, what in ((prompt.PromptSpec(3), "prompt"), (prompt.PrefixSpec(3), "prefix")):
    with pytest.raises(ConfigError, match=f"^{what} tuning needs a model family with "
                                          f"virtual-token hooks .*; vit has none$"):
      spec.inject(Bare(), rngs=nnx.Rngs(0))
  hf_models.tiny_model("distilbert", "classification").save_pretrained(tmp_path / "base")
  model, params = models.from_pretrained(str(tmp_path / "base"), task="classification")
  tuned, tuned_params = adapter.add_adapters(model, params, (prompt.PrefixSpec(3),),
                                             jax.random.key(0))
  with pytest.raises(CheckpointError, match="DistilBERT takes no past_key_values"):
    hf_adapter.save_adapter(tuned, tuned_params, tmp_path / "adapter")
  with pytest.raises(ConfigError, match="init_text='hi' is not tokenised yet"):
    adapter.add_adapters(model, params, (prompt.PromptSpec(3, init_text="hi"),),
                         jax.random.key(0))


# --- Training through the run machinery ----------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("prompt_tiny")
  return tiny.make_model(root / "model", minilm_dir), tiny.make_data(root / "data", data_dir)


def _copy(tree):
  return jax.tree.map(np.array, tree)


def _train(config, devices, num_steps=3):
  """(run, state before, state after, losses) of `num_steps` train steps."""
  run = train.setup(config, devices)
  before = _copy(run.initial_state)
  train_step, _ = train.compile_steps(run)
  iterator = run.data.train_iterator(num_steps)
  state, losses = run.initial_state, []
  for _ in range(num_steps):
    state, metrics = train_step(state, run.device_batch(config.data.train_split,
                                                        next(iterator)), jax.random.key(0))
    losses.append(float(metrics["loss"]))
  return run, before, state, losses


@pytest.mark.parametrize("overrides", [
    {"strategy.name": "prompt", "strategy.prompt.init_text": "a review:"},
    {"strategy.name": "prefix", "strategy.prefix.projection": True,
     "strategy.prefix.projection_size": 16},
], ids=["prompt", "prefix-proj"])
def test_training_moves_only_the_virtual_tokens_and_the_head(tiny_dirs, overrides):
  model_dir, data_path = tiny_dirs
  overrides = {**overrides, "training.num_steps": 3, "strategy.prompt.num_virtual_tokens": 4,
               "strategy.prefix.num_virtual_tokens": 4}
  config = tiny.config(model_dir, data_path, **overrides)
  run, before, state, losses = _train(config, jax.devices()[:1])
  trainable = sorted(p for p, label in run.path_labels.items() if label == partition.TRAINABLE)
  assert trainable == sorted(adapter.adapter_paths(run.model)
                             + [p for p in run.path_labels if p.startswith("classifier/")])
  if overrides["strategy.name"] == "prompt":  # started from the text's token embeddings
    ids = run.tokenizer("a review:")["input_ids"]
    np.testing.assert_array_equal(before.trainable["prompt"]["embedding"],
                                  before.frozen["embeddings"]["word"]["embedding"][(ids * 4)[:4]])
  assert np.isfinite(losses).all()
  for path, value in keymap.flatten(before.frozen).items():
    np.testing.assert_array_equal(keymap.flatten(state.frozen)[path], value, err_msg=path)
  for path, value in keymap.flatten(before.trainable).items():
    assert not np.array_equal(keymap.flatten(state.trainable)[path], value), path
  trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(before.trainable))
  assert 2 * trainable_bytes <= optim.state_bytes(state.opt_state) <= 2 * trainable_bytes + 64

  # Sharded by the logical axes (`virtual` and `prefix_mlp` replicated): the same losses.
  mesh = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
  _, _, sharded, sharded_losses = _train(tiny.config(model_dir, data_path, **overrides, **mesh),
                                         jax.devices()[:4])
  np.testing.assert_allclose(sharded_losses, losses, atol=1e-5)
  specs = {p: x.sharding.spec for p, x in keymap.flatten(sharded.trainable).items()}
  if overrides["strategy.name"] == "prompt":
    assert specs["prompt/embedding"] == P(None, "fsdp")
  else:
    assert specs["prefix/embedding"] == P(None, "fsdp")
    assert specs["encoder/layers/0/attention/prefix/key/kernel"] == P(None, "tensor", None)


def test_a_stopped_prefix_run_resumes_bitwise(tiny_dirs, tmp_path):
  model_dir, data_path = tiny_dirs
  config = tiny.config(model_dir, data_path, **{
      "strategy.name": "prefix", "strategy.prefix.num_virtual_tokens": 4,
      "strategy.prefix.projection": True, "strategy.prefix.projection_size": 16,
      "checkpoint.every_steps": 3, "eval.splits": ("validation",)})
  devices = jax.devices()[:1]
  train.train_and_evaluate(config, str(tmp_path / "straight"), devices=devices)
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3, devices=devices)
  train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=devices)
  state = train.setup(config, devices).initial_state
  target = checkpoint.abstract({"step": state.step, "trainable": state.trainable,
                                "opt_state": state.opt_state})
  finals = [keymap.flatten(_copy(checkpoint.Checkpointer(tmp_path / name, config)
                                 .restore(6, target)[0]["trainable"]))
            for name in ("straight", "resumed")]
  assert "prefix/embedding" in finals[0]
  for path, value in finals[0].items():
    np.testing.assert_array_equal(finals[1][path], value, err_msg=path)


def test_a_packed_decoder_run_trains_the_prompt_only(tmp_path, data_dir):
  tiny.make_tokenizer(tmp_path / "tokenizer", data_dir, vocab_size=512)
  model_dir = tiny.make_decoder(tmp_path / "llama", tmp_path / "tokenizer")
  data = tiny.make_instruct_data(tmp_path / "data", data_dir, "instruction",
                                 sizes=(("train", 24), ("test", 8)))
  config = tiny.lm_config(model_dir, data, **{
      "strategy.name": "prompt", "strategy.prompt.num_virtual_tokens": 4, "data.packing": True,
      "training.num_steps": 2, "eval.every_steps": 2, "eval.max_examples": 8})
  results = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert np.isfinite(results["test/loss"])
  run = train.setup(config, jax.devices()[:1])
  assert [p for p, label in run.path_labels.items() if label == partition.TRAINABLE] == [
      prompt.PROMPT_PATH]
