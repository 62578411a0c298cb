"""Generation: ftjax's KV-cache decode loop against transformers' `generate`, token for token.

Tiny random PyTorch models (Llama with grouped queries, Qwen2, GPT-2) are
saved with `save_pretrained` and loaded by ftjax. Their weights are drawn
with a larger initializer_range than the default: at 0.02 a tiny model repeats
one token forever, which would pass even with wrong positions or a stale
cache; at 0.5-1.0 it wanders through the vocabulary, so every step checks
something. Prompts have different lengths and are left-padded on both sides.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from ftjax import generate as generate_lib
from ftjax import models
from ftjax.errors import ConfigError
from tests import hf_models

MODEL_TYPES = ["llama", "qwen2", "gpt2"]
# Wide enough that greedy choices are no near-ties (checked when picked: the
# smallest top-1/top-2 logit gap over these prompts is > 3e-3).
INIT_STD = {"llama": 0.5, "qwen2": 0.5, "gpt2": 1.0}
PAD = 0
NEW = 16
PROMPTS = [list(np.random.RandomState(0).randint(3, 99, size=n)) for n in (7, 3, 5)]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def tiny(request, tmp_path_factory):
  """(PyTorch model, ftjax model, ftjax params) of one family."""
  model_type = request.param
  pt_model = hf_models.tiny_decoder(model_type, "causal_lm",
                                    initializer_range=INIT_STD[model_type])
  folder = tmp_path_factory.mktemp(model_type)
  pt_model.save_pretrained(folder)
  model, params = models.from_pretrained(str(folder), task="causal_lm")
  return pt_model, model, params


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  pt_model = hf_models.tiny_decoder("llama", "causal_lm", initializer_range=INIT_STD["llama"])
  assert pt_model.config.num_key_value_heads < pt_model.config.num_attention_heads
  folder = tmp_path_factory.mktemp("llama")
  pt_model.save_pretrained(folder)
  model, params = models.from_pretrained(str(folder), task="causal_lm")
  return pt_model, model, params


def torch_generate(pt_model, prompts, max_new_tokens, eos_token_id):
  """transformers' greedy new tokens per row, cut after the first EOS; left padding."""
  input_ids, attention_mask = generate_lib.left_pad(prompts, PAD)
  # generate() falls back to the generation config's EOS when given None.
  pt_model.generation_config.eos_token_id = eos_token_id
  with torch.no_grad():
    out = pt_model.generate(torch.tensor(input_ids, dtype=torch.long),
                            attention_mask=torch.tensor(attention_mask), do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=PAD)
  eos = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
  rows = []
  for row in out[:, input_ids.shape[1]:].tolist():
    ends = [i for i, t in enumerate(row) if t in eos]
    rows.append(row[:ends[0] + 1] if ends else row)
  return rows


def test_greedy_equals_transformers(tiny):
  pt_model, model, params = tiny
  reference = torch_generate(pt_model, PROMPTS, NEW, None)
  out = generate_lib.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_token_id=(),
                              pad_token_id=PAD)
  assert out.tokens == reference
  assert all(len(set(row)) > 3 for row in reference)  # not one repeated token
  assert out.steps == NEW and not out.finished_b.any()
  input_ids, attention_mask = generate_lib.left_pad(PROMPTS, PAD)
  assert out.sequences_bt.shape == (3, 7 + NEW)
  np.testing.assert_array_equal(out.sequences_bt[:, :7], input_ids)
  np.testing.assert_array_equal(out.sequences_bt[:, 7:], reference)
  np.testing.assert_array_equal(out.attention_mask_bt[:, :7], attention_mask)
  assert out.attention_mask_bt[:, 7:].all()


def test_row_stops_at_eos(tiny):
  """EOS = the token row 0 produces third: row 0 stops there, the others run on."""
  pt_model, model, params = tiny
  free = torch_generate(pt_model, PROMPTS, NEW, None)
  eos = free[0][2]
  assert eos not in free[0][:2]
  assert any(eos not in row for row in free[1:])  # some row does not stop
  reference = torch_generate(pt_model, PROMPTS, NEW, eos)
  out = generate_lib.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_token_id=eos,
                              pad_token_id=PAD)
  assert out.tokens == reference
  assert out.tokens[0] == free[0][:3]
  assert out.finished_b[0] and not out.finished_b.all()
  assert out.steps == NEW
  # After its EOS, row 0 holds padding, masked out.
  np.testing.assert_array_equal(out.sequences_bt[0, 7 + 3:], PAD)
  np.testing.assert_array_equal(out.attention_mask_bt[0], [1] * 10 + [0] * (NEW - 3))


def test_loop_stops_when_every_row_has_finished(tiny_llama):
  """Every row's second token is an EOS (several ids): two steps, not max_new_tokens."""
  pt_model, model, params = tiny_llama
  free = torch_generate(pt_model, PROMPTS, NEW, None)
  eos = sorted({row[1] for row in free})
  reference = torch_generate(pt_model, PROMPTS, NEW, eos)
  out = generate_lib.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_token_id=eos,
                              pad_token_id=PAD)
  assert out.tokens == reference
  assert out.finished_b.all() and out.steps == max(len(row) for row in reference) <= 2
  np.testing.assert_array_equal(out.sequences_bt[:, 7 + out.steps:], PAD)


def test_eos_defaults_to_the_config(tiny_llama):
  """eos_token_id=None reads config.json's eos_token_id, as transformers does."""
  _, model, params = tiny_llama
  free = generate_lib.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_token_id=())
  eos = free.tokens[0][2]
  hf_extra = dict(model.config.hf_extra, eos_token_id=eos)
  with_eos = models.Model.build(dataclasses.replace(model.config,
                                                    hf_extra=tuple(sorted(hf_extra.items()))))
  out = generate_lib.generate(with_eos, params, PROMPTS, max_new_tokens=NEW)
  assert out.tokens == generate_lib.generate(model, params, PROMPTS, max_new_tokens=NEW,
                                             eos_token_id=eos).tokens
  assert out.tokens[0] == free.tokens[0][:3]


def test_padded_array_prompts_equal_list_prompts(tiny_llama):
  _, model, params = tiny_llama
  input_ids, attention_mask = generate_lib.left_pad(PROMPTS, PAD)
  from_lists = generate_lib.generate(model, params, PROMPTS, max_new_tokens=4, eos_token_id=())
  from_array = generate_lib.generate(model, params, input_ids, attention_mask=attention_mask,
                                     max_new_tokens=4, eos_token_id=())
  assert from_array.tokens == from_lists.tokens
  # A longer cache changes nothing but the memory used.
  longer = generate_lib.generate(model, params, PROMPTS, max_new_tokens=4, eos_token_id=(),
                                 max_len=20)
  assert longer.tokens == from_lists.tokens


def test_top_k_one_and_tiny_top_p_equal_greedy(tiny_llama):
  _, model, params = tiny_llama
  greedy = generate_lib.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_token_id=())
  for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
    sampled = generate_lib.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_token_id=(),
                                    temperature=1.5, rng=jax.random.key(3), **kwargs)
    assert sampled.tokens == greedy.tokens, kwargs


def test_sampling_is_reproducible_and_depends_on_the_key(tiny_llama):
  _, model, params = tiny_llama
  kw = dict(max_new_tokens=NEW, eos_token_id=(), temperature=1.0)
  first = generate_lib.generate(model, params, PROMPTS, rng=jax.random.key(0), **kw)
  again = generate_lib.generate(model, params, PROMPTS, rng=jax.random.key(0), **kw)
  other = generate_lib.generate(model, params, PROMPTS, rng=jax.random.key(1), **kw)
  greedy = generate_lib.generate(model, params, PROMPTS, max_new_tokens=NEW, eos_token_id=())
  assert first.tokens == again.tokens
  assert first.tokens != other.tokens
  assert first.tokens != greedy.tokens


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 10, 0.5), (1.0, 0, 0.95)])
def test_filters_match_transformers_logits_warpers(temperature, top_k, top_p):
  """The tokens left after temperature, top-k and top-p: transformers' warpers, in order."""
  logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 3
  warpers = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(temperature)])
  if top_k:
    warpers.append(transformers.TopKLogitsWarper(top_k))
  if top_p < 1:
    warpers.append(transformers.TopPLogitsWarper(top_p))
  expected = warpers(None, torch.tensor(logits)).numpy()
  ours = np.asarray(generate_lib.filter_logits(logits, temperature=temperature, top_k=top_k,
                                               top_p=top_p if top_p < 1 else None))
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
  kept = np.isfinite(expected)
  assert 0 < kept.sum() < kept.size  # the filters did remove something
  np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6)


def test_compiles_once_per_shape(tiny_llama):
  _, model, params = tiny_llama
  compiled = generate_lib._generate._cache_size  # pylint: disable=protected-access
  kw = dict(max_new_tokens=5, eos_token_id=())
  before = compiled()
  generate_lib.generate(model, params, PROMPTS, **kw)
  assert compiled() == before + 1
  # Other prompts of the same padded length, another EOS, another key: no retrace.
  generate_lib.generate(model, params, [p[::-1] for p in PROMPTS], **kw)
  generate_lib.generate(model, params, PROMPTS, max_new_tokens=5, eos_token_id=(7,))
  assert compiled() == before + 1
  sample = dict(kw, temperature=0.8, top_p=0.9)
  generate_lib.generate(model, params, PROMPTS, rng=jax.random.key(0), **sample)
  generate_lib.generate(model, params, PROMPTS, rng=jax.random.key(1),
                        **dict(sample, temperature=1.2, top_p=0.5))
  assert compiled() == before + 2
  generate_lib.generate(model, params, PROMPTS, max_new_tokens=6, eos_token_id=())
  assert compiled() == before + 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), r"max_new_tokens=0; expected at least 1"),
    (dict(temperature=0.5), r"temperature=0.5 samples and needs rng="),
    (dict(top_p=0.0, temperature=1.0), r"top_p=0.0; expected 0 < top_p <= 1"),
    (dict(top_k=-1), r"top_k=-1; expected >= 0"),
    (dict(eos_token_id=99), r"eos_token_id 99 is outside the vocabulary \[0, 99\)"),
    (dict(max_len=9), r"max_len=9 cannot hold the 7-token prompts and 4 new tokens; expected "
                      r"at least 11"),
    (dict(prompts=[[5, 6], []]), r"prompt 1 has no tokens"),
    (dict(prompts=np.array([[5, 6, 7]]), attention_mask=np.array([[1, 1, 0]])),
     r"prompt row 0 has attention_mask \[1, 1, 0\]; generate needs LEFT-padded prompts"),
])
def test_bad_arguments_are_one_line(tiny_llama, kwargs, match):
  _, model, params = tiny_llama
  kwargs = dict(dict(prompts=PROMPTS, max_new_tokens=4), **kwargs)
  with pytest.raises(ConfigError, match=match) as info:
    generate_lib.generate(model, params, kwargs.pop("prompts"), **kwargs)
  assert "\n" not in str(info.value)


def test_learned_positions_bound_the_length(tmp_path):
  pt_model = hf_models.tiny_decoder("gpt2", "causal_lm")
  pt_model.save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="causal_lm")
  with pytest.raises(ConfigError, match=r"7 prompt \+ 60 new tokens exceed the model's 64 "
                                        r"learned positions"):
    generate_lib.generate(model, params, PROMPTS, max_new_tokens=60)


def test_generate_needs_a_causal_lm(tmp_path):
  hf_models.tiny_decoder("qwen2", "classification").save_pretrained(tmp_path)
  model, params = models.from_pretrained(str(tmp_path), task="classification")
  with pytest.raises(ConfigError, match=r"needs a causal_lm model; this one has "
                                        r"task='classification'"):
    generate_lib.generate(model, params, PROMPTS, max_new_tokens=4)
