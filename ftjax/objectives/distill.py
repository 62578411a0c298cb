"""Knowledge distillation: a frozen teacher trains a student, wrapping a base objective.

  config.objective.name = "distill"
  config.objective.base = ""          # the wrapped objective; "" = that of model.task
  config.objective.teacher = DIR      # HF folder, hub id, GGUF file or a finished ftjax run

The loss of a batch (per row for classification, per response token for a
causal LM, over the base objective's loss mask):

  alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher / T, student / T)
      + hidden_weight * H(student hidden states, teacher hidden states)

with `D` forward KL(teacher || student), reverse KL(student || teacher) or
the generalised Jensen-Shannon divergence of GKD with `beta` (mixture
beta * teacher + (1 - beta) * student, as TRL computes it), and `H` the MSE
or cosine distance between chosen student and teacher layers' hidden states,
through a learned linear projection when their widths differ (the
projection is the objective's own trainable parameter: optimised and
checkpointed, never exported).

The teacher is a reference model (`Objective.references`): loaded once,
frozen, sharded by the student's rules, never differentiated, no optimizer
state, not checkpointed; its identity is part of the run's, so resuming
with another teacher is refused. `teacher_dtype="bfloat16"` holds and runs
it in bfloat16.

`cache_teacher=True` runs the teacher once over the training split before
training and keeps its outputs under `<workdir>/feature_cache/` (keyed by
the teacher, the data's token ids, the temperature and `top_k`): the full
logits for classification; for a causal LM the `top_k` largest logits of
each token (at temperature T) plus the log-sum-exp of the rest, so the loss
compares k + 1 outcomes (the top k and "the rest") instead of the
vocabulary. `top_k = 0` keeps the whole vocabulary (the cached loss then
equals the online one). Online, `top_k > 0` computes the same k + 1
outcome loss, so a cached run and an online run train the same.

A student cut from the teacher's layers is `model.name_or_path = <teacher>`
with `model.layers = (0, 2, 4)` (`ftjax.core.sources`): DistilBERT's
initialisation. Student and teacher must share the tokenizer.
"""

import hashlib
import json
import math
import pathlib
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ftjax import feature_cache, sharding
from ftjax.core import sources
from ftjax.data import instruct, pipeline
from ftjax.errors import ConfigError
from ftjax.objectives import base
from ftjax.objectives.divergences import (DIVERGENCES, HIDDEN_LOSSES, divergence,
                                          hidden_distance, teacher_summary, topk_divergence)

TEACHER_DTYPES = ("", "float32", "bfloat16")
BASES = ("classification", "causal_lm")


def _base_class(config) -> type[base.Objective]:
  from ftjax import objectives  # pylint: disable=g-import-not-at-top (registry imports us)
  name = config.objective.get("base", "") or config.model.task
  if name not in BASES:
    raise ConfigError(f"config key 'objective.base' is {name!r}; expected one of {BASES} "
                      f"(or '' for the objective of model.task)")
  return objectives.get(name)


class Distill(base.Objective):
  """See the module docstring."""

  name = "distill"
  head = ""        # The wrapped objective's (`head_for`).
  metrics = ()     # The wrapped objective's (`metrics_for`).
  references = ("teacher",)

  @classmethod
  def config(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # The wrapped objective ("classification" or "causal_lm"); "": that of model.task.
    c.base = ""
    # The teacher: a Hugging Face folder or hub id, a GGUF file, or a finished ftjax
    # run's workdir (its latest checkpoint) or <workdir>/checkpoints/<step>.
    c.teacher = ""
    # The teacher's weights and compute dtype; "": model.dtype.
    c.teacher_dtype = ""
    # Weight of the hard-label loss; 1 - alpha weighs the teacher's soft labels.
    c.alpha = 0.5
    c.temperature = 2.0
    # "forward_kl" KL(teacher || student), "reverse_kl" KL(student || teacher) or
    # "jsd" (generalised Jensen-Shannon with `beta`, in (0, 1)).
    c.divergence = "forward_kl"
    c.beta = 0.5
    # Hidden-state distillation (0: off): "mse" or "cosine" between
    # `hidden_layers` pairs ((student, teacher), ...) of hidden-state indices
    # (0: the embeddings, i: the output of layer i); (): student layer j with
    # teacher layer round(j * L_teacher / L_student), j = 1..L_student.
    c.hidden_weight = 0.0
    c.hidden_loss = "mse"
    c.hidden_layers = ()
    # Run the teacher once over the training split and keep its outputs on disk.
    c.cache_teacher = False
    # Causal LM: the teacher's k most likely tokens per position (plus "the rest");
    # 0: the whole vocabulary.
    c.top_k = 0
    return c

  @classmethod
  def head_for(cls, config) -> str:
    return _base_class(config).head_for(config)

  @classmethod
  def metrics_for(cls, config) -> tuple[str, ...]:
    return _base_class(config).metrics_for(config)

  @classmethod
  def check_config(cls, config) -> None:
    def require(ok, key, value, expected):
      if not ok:
        raise ConfigError(f"config key {key!r} is {value!r}; expected {expected}")

    o = config.objective
    base_cls = _base_class(config)
    require(bool(o.teacher), "objective.teacher", o.teacher,
            "a teacher (a Hugging Face folder or hub id, a GGUF file or an ftjax run's workdir)")
    require(o.teacher_dtype in TEACHER_DTYPES, "objective.teacher_dtype", o.teacher_dtype,
            f"one of {TEACHER_DTYPES}")
    require(0 <= o.alpha <= 1, "objective.alpha", o.alpha, "a weight in [0, 1]")
    require(o.temperature > 0, "objective.temperature", o.temperature, "a temperature > 0")
    require(o.divergence in DIVERGENCES, "objective.divergence", o.divergence,
            f"one of {DIVERGENCES}")
    require(o.divergence != "jsd" or 0 < o.beta < 1, "objective.beta", o.beta,
            "a mixture weight in (0, 1) for divergence='jsd' (forward_kl and reverse_kl are "
            "its limits)")
    require(o.hidden_weight >= 0, "objective.hidden_weight", o.hidden_weight, ">= 0 (0: off)")
    require(o.hidden_loss in HIDDEN_LOSSES, "objective.hidden_loss", o.hidden_loss,
            f"one of {HIDDEN_LOSSES}")
    require(all(len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p)
                for p in o.hidden_layers), "objective.hidden_layers", o.hidden_layers,
            "(student, teacher) pairs of hidden-state indices >= 0")
    require(o.top_k >= 0, "objective.top_k", o.top_k, ">= 0 (0: the whole vocabulary)")
    require(o.top_k == 0 or base_cls.name == "causal_lm", "objective.top_k", o.top_k,
            "0 for classification (its logits are cached whole)")
    require(not (o.cache_teacher and o.hidden_weight), "objective.hidden_weight",
            o.hidden_weight, "0 with objective.cache_teacher=True (the cache keeps the "
            "teacher's logits, not its hidden states)")
    require(config.strategy.name != "head_only", "strategy.name", config.strategy.name,
            "full, freeze or lora for distillation (it trains the student's layers)")
    base_cls.check_config(config)

  def __init__(self, config):
    super().__init__(config)
    self.base = _base_class(config)(config)
    self.metrics = self.base.metrics
    self.head = self.base.head
    self.teacher_model = None
    self.teacher_cache = None   # the training split's teacher outputs, when cached
    self._token_offsets = None  # causal LM cache: each example's first token row

  def __getattr__(self, name):  # the base objective's state (tokenizer, task_names, ...)
    if name.startswith("__") or name == "base":
      raise AttributeError(name)
    return getattr(self.base, name)

  @property
  def o(self) -> ml_collections.ConfigDict:
    return self.config.objective

  @property
  def uses_teacher(self) -> bool:
    return self.o.alpha < 1 or self.o.hidden_weight > 0

  # The teacher.

  def load_references(self, model, tokenizer, shardings):
    o, m = self.o, self.config.model
    classification = self.base.head == "classification"
    source = sources.load(
        o.teacher, task=m.task, num_labels=model.config.num_labels if classification else None,
        dtype=o.teacher_dtype or m.dtype, pooling=m.pooling, allow_pickle=m.allow_pickle,
        seed=self.config.seed, shardings=shardings)
    _check_vocabularies(o.teacher, source, m.name_or_path, model, tokenizer,
                        compare_logits=not classification)
    if source.new_paths:
      raise ConfigError(f"config key 'objective.teacher' is {o.teacher!r}, which has no trained "
                        f"{m.task} head ({source.new_paths[0]} is not in it); expected a "
                        f"fine-tuned checkpoint or run")
    params = source.params
    if o.teacher_dtype == "bfloat16":
      params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    self.teacher_model = source.model
    identity = {"teacher": o.teacher, "weights": _weight_sizes(o.teacher), **source.identity}
    logging.info("teacher %s: %s %d layers, %d parameters (%s)", o.teacher,
                 source.model.config.model_type, source.model.config.num_layers,
                 source.model.num_params(), o.teacher_dtype or m.dtype)
    return {"teacher": base.Reference(source.model, params, identity)}

  def hidden_pairs(self, model) -> tuple[tuple[int, int], ...]:
    """(student, teacher) hidden-state indices of the hidden-state loss."""
    ls, lt = model.config.num_layers, self.teacher_model.config.num_layers
    pairs = tuple(tuple(p) for p in self.o.hidden_layers) or tuple(
        (j, round(j * lt / ls)) for j in range(1, ls + 1))
    for s, t in pairs:
      if s > ls or t > lt:
        raise ConfigError(f"config key 'objective.hidden_layers' is {self.o.hidden_layers!r}; "
                          f"expected student indices in [0, {ls}] and teacher indices in "
                          f"[0, {lt}] (0 is the embeddings)")
    return pairs

  def init_params(self, model, rng):
    if not self.o.hidden_weight:
      return {}
    pairs = self.hidden_pairs(model)
    ds, dt = model.config.hidden_size, self.teacher_model.config.hidden_size
    if ds == dt:
      return {}
    keys = jax.random.split(rng, len(pairs))
    return {"projection": {str(s): {"kernel": jax.random.normal(k, (ds, dt)) / math.sqrt(ds),
                                    "bias": jnp.zeros((dt,))}
                           for (s, _), k in zip(pairs, keys)}}

  # Data.

  def build_data(self, model, tokenizer):
    self.model = model
    return self.base.build_data(model, tokenizer)

  def prepare(self, run):
    self.base.prepare(run)
    if self.o.cache_teacher and self.uses_teacher:
      self.teacher_cache = _teacher_cache(self, run)

  def host_batch(self, split_name, batch):
    out = dict(self.base.host_batch(split_name, batch))
    if self.teacher_cache is None or split_name != self.config.data.train_split:
      return out
    if "logits" in self.teacher_cache:
      out["teacher_logits"] = self.teacher_cache["logits"][batch["index"]]
      return out
    example_ids = batch["example_ids"]
    real = example_ids >= 0
    rows = np.where(real, self._token_offsets[np.maximum(example_ids, 0)] + batch["positions"], 0)
    for key in ("values", "indices", "rest"):
      values = self.teacher_cache[key][rows]
      mask = real.reshape(real.shape + (1,) * (values.ndim - 2))
      out[f"teacher_{key}"] = np.where(mask, values, 0).astype(values.dtype)
    return out

  # The loss.

  def teacher_outputs(self, refs, batch):
    return self.base.forward(self.teacher_model, refs["teacher"], batch, rng=None,
                             deterministic=True)

  def loss(self, model, params, objective_params, refs, batch, *, rng, deterministic,
           normalizer):
    out = self.base.forward(model, params, batch, rng=rng, deterministic=deterministic)
    hard, sums = self.base.hard_loss(out.logits, batch, normalizer)
    if not self.uses_teacher:
      return hard, sums
    o, denominator = self.o, jnp.maximum(normalizer, 1.0)
    kd_sum, hidden_sum = self.distill_sums(model, out, objective_params, refs, batch)
    loss = o.alpha * hard + (1 - o.alpha) * kd_sum / denominator
    if o.hidden_weight:
      loss = loss + o.hidden_weight * hidden_sum / denominator
    return loss, {**sums, "ce_sum": hard * denominator, "kd_sum": kd_sum,
                  "hidden_sum": hidden_sum}

  def distill_sums(self, model, out, objective_params, refs, batch):
    """(weighted sum of T^2 * D over the loss mask, weighted sum of H)."""
    o = self.o
    t = o.temperature
    weights = self.base.logit_weights(batch)
    student = out.logits.astype(jnp.float32) / t
    teacher_out = None
    if "teacher_logits" in batch:
      per = divergence(student, batch["teacher_logits"].astype(jnp.float32) / t,
                       o.divergence, o.beta)
    elif "teacher_values" in batch:
      per = topk_divergence(student, batch["teacher_values"], batch["teacher_indices"],
                            batch["teacher_rest"], o.divergence, o.beta)
    else:
      teacher_out = jax.lax.stop_gradient(self.teacher_outputs(refs, batch))
      teacher = teacher_out.logits.astype(jnp.float32) / t
      if o.top_k:
        per = topk_divergence(student, *teacher_summary(teacher, o.top_k), o.divergence,
                              o.beta)
      else:
        per = divergence(student, teacher, o.divergence, o.beta)
    kd_sum = (per * weights).sum() * t ** 2
    hidden_sum = jnp.zeros(())
    if o.hidden_weight:
      token_weights = self.base.token_weights(batch)
      pairs = self.hidden_pairs(model)
      projection = objective_params.get("projection", {})
      for s, t_index in pairs:
        hs = out.hidden_states[s].astype(jnp.float32)
        ht = teacher_out.hidden_states[t_index].astype(jnp.float32)
        if str(s) in projection:
          hs = hs @ projection[str(s)]["kernel"] + projection[str(s)]["bias"]
        hidden_sum = hidden_sum + (hidden_distance(hs, ht, o.hidden_loss) * token_weights).sum()
      hidden_sum = hidden_sum / len(pairs)
    return kd_sum, hidden_sum

  def step_metrics(self, sums):
    out = self.base.step_metrics(sums)
    if "kd_sum" in sums:
      weight = jnp.maximum(sums["weight"], 1.0)
      out.update(ce_loss=sums["ce_sum"] / weight, kd_loss=sums["kd_sum"] / weight)
      if self.o.hidden_weight:
        out["hidden_loss"] = sums["hidden_sum"] / weight
    return out

  def normalizer(self, batch):
    return self.base.normalizer(batch)

  def log_metrics(self, window):
    return self.base.log_metrics(window)

  # Evaluation: the student, as the base objective evaluates it.

  def eval_outputs(self, model, params, objective_params, refs, batch):
    return self.base.eval_outputs(model, params, objective_params, refs, batch)

  def eval_metrics(self, outputs):
    return self.base.eval_metrics(outputs)

  def extra_eval(self, run, state, split_name, step):
    return self.base.extra_eval(run, state, split_name, step)

  @staticmethod
  def batch_spec(batch_size, length):
    raise NotImplementedError("the wrapped objective's batch_spec, plus teacher_* arrays when "
                              "the teacher is cached")


def _weight_sizes(name_or_path: str) -> list:
  """(name, bytes) of a local checkpoint's weight files: a rewritten teacher is another one."""
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_file():
    return [[path.name, path.stat().st_size]]
  if not path.is_dir() or sources.is_run(name_or_path):
    return []
  return [[p.name, p.stat().st_size] for p in sorted(path.iterdir())
          if p.suffix in (".safetensors", ".bin", ".gguf")]


def _vocabulary(tokenizer) -> dict:
  return tokenizer.get_vocab() if tokenizer is not None else {}


def _check_vocabularies(teacher_name, teacher, student_name, student_model, student_tokenizer,
                        *, compare_logits: bool) -> None:
  tv, sv = _vocabulary(teacher.tokenizer), _vocabulary(student_tokenizer)
  t_size = teacher.model.config.vocab_size
  s_size = student_model.config.vocab_size
  if tv != sv or (compare_logits and t_size != s_size):
    raise ConfigError(
        f"the teacher {teacher_name!r} ({teacher.model.config.model_type}, {len(tv)}-token "
        f"vocabulary, {t_size} logits) and the student {student_name!r} "
        f"({student_model.config.model_type}, {len(sv)}-token vocabulary, {s_size} logits) use "
        f"different tokenizers; expected the same tokenizer (distillation feeds both the same "
        f"token ids and compares their outputs)")


def _teacher_cache(objective: Distill, run) -> dict:
  """The teacher's outputs on every training example, computed once (cached on disk)."""
  o, config = objective.o, run.config
  split = run.train_split
  causal = objective.base.head == "causal_lm"
  tokens = 0
  for ids in split.input_ids:
    tokens = zlib.crc32(np.asarray(ids).tobytes(), tokens)
  identity = {"teacher": run.identity.get("references.teacher"), "dtype": o.teacher_dtype,
              "base": objective.base.name, "split": config.data.train_split,
              "examples": len(split.input_ids), "tokens": tokens,
              "temperature": o.temperature if causal else None, "top_k": o.top_k if causal else None,
              "pooling": config.model.pooling}
  key = "teacher-" + hashlib.sha256(json.dumps(identity, sort_keys=True, default=str)
                                    .encode()).hexdigest()[:24]
  lengths = np.array([len(ids) for ids in split.input_ids], np.int64)
  objective._token_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  teacher_params = run.refs["teacher"]
  batch_sharding = sharding.batch_sharding(config, run.mesh)
  vocab = objective.teacher_model.config.vocab_size
  k = min(o.top_k or vocab, vocab)

  def outputs(params, batch):
    # The rows' bookkeeping comes back with the outputs: replicated, so every host
    # fills every row whichever host's batch it was.
    where = {key: batch[key] for key in ("index", "example_ids", "positions", "weights")
             if key in batch}
    logits = objective.teacher_outputs({"teacher": params}, batch).logits.astype(jnp.float32)
    if not causal:
      return logits, where
    return teacher_summary(logits / o.temperature, k), where

  step = jax.jit(outputs, out_shardings=sharding.replicated(run.mesh))

  def compute():
    if causal:
      total = int(lengths.sum())
      out = {"values": np.zeros((total, k), np.float32),
             "indices": np.zeros((total, k), np.int32), "rest": np.zeros((total,), np.float32)}
      batches = instruct.eval_batches(split, global_batch_size=config.eval.batch_size,
                                      buckets=run.buckets, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    else:
      out = {"logits": np.zeros((len(split.input_ids), run.model.config.num_labels), np.float32)}
      batches = pipeline.eval_batches(split, global_batch_size=config.eval.batch_size,
                                      buckets=run.buckets, process_index=jax.process_index(),
                                      process_count=jax.process_count(), pad_id=run.pad_id)
    filled = 0
    for batch in batches:
      result, where = jax.device_get(step(teacher_params, sharding.put_batch(batch,
                                                                             batch_sharding)))
      real = where["weights"] > 0
      if not causal:
        out["logits"][where["index"][real]] = result[real]
        filled += int(real.sum())
        continue
      ex = where["example_ids"]
      mask = (ex >= 0) & real[:, None]
      rows = objective._token_offsets[ex[mask]] + where["positions"][mask]
      for name, value in zip(("values", "indices", "rest"), result):
        out[name][rows] = value[mask]
      filled += int(real.sum())
    assert filled == len(split.input_ids), (filled, len(split.input_ids))
    return out

  cache, hit = feature_cache.load_or_compute(run.feature_cache_dir, key, compute)
  logging.info("teacher outputs on %s (%d examples) %s; cache: %s", config.data.train_split,
               len(split.input_ids), "read from the cache" if hit else "computed",
               run.feature_cache_dir or "memory only")
  return cache
