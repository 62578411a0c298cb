"""Sequence classification: cross-entropy over labels, accuracy and macro precision/recall/F1.

Batches (`ftjax.data.pipeline`): `input_ids`, `attention_mask` (and
`token_type_ids` for sentence pairs), `labels`, `weights` (0 for padding
rows). With `strategy.cache_features` (head-only), the encoder's output is
computed once per example (`ftjax.feature_cache`) and the batch carries
`features` instead of token ids.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from ftjax import feature_cache, metrics
from ftjax.data import pipeline, sources
from ftjax.errors import ConfigError, FtjaxError
from ftjax.objectives import base
from ftjax.peft import partition


class Classification(base.Objective):
  name = "classification"
  head = "classification"
  metrics = ("loss", "accuracy", "precision", "recall", "f1")

  @staticmethod
  def batch_spec(batch_size: int, length: int) -> dict:
    """The arrays of a token batch (`features` replace the ids with cached features)."""
    i32, f32 = jnp.int32, jnp.float32
    return {"input_ids": jax.ShapeDtypeStruct((batch_size, length), i32),
            "attention_mask": jax.ShapeDtypeStruct((batch_size, length), i32),
            "labels": jax.ShapeDtypeStruct((batch_size,), i32),
            "weights": jax.ShapeDtypeStruct((batch_size,), f32)}

  @classmethod
  def check_config(cls, config) -> None:
    def require(ok, key, value, expected):
      if not ok:
        raise ConfigError(f"config key {key!r} is {value!r}; expected {expected}")

    d = config.data
    require(not d.packing, "data.packing", d.packing,
            "False unless model.task='causal_lm' (packing is for instruction tuning)")
    require(not d.mixture, "data.mixture", tuple(entry[0] for entry in d.mixture),
            "empty unless model.task='causal_lm' (mixing is for instruction tuning)")
    require(not config.eval.generate_examples, "eval.generate_examples",
            config.eval.generate_examples, "0 unless model.task='causal_lm'")

  def __init__(self, config):
    super().__init__(config)
    # head-only: the encoder runs in inference mode and only the head sees
    # dropout, which is what cached features compute (an exact speed-up).
    self.frozen_encoder = config.strategy.name == "head_only"
    self.features = None  # split -> (examples, embed) head inputs, when cached

  def build_data(self, model, tokenizer) -> base.Data:
    self.num_labels = model.config.num_labels
    return text_data(self.config, tokenizer, num_labels=self.num_labels)

  def prepare(self, run) -> None:
    if self.config.strategy.cache_features:
      self.features = _cached_features(run)

  def host_batch(self, split_name, batch):
    if self.features is None:
      return super().host_batch(split_name, batch)
    return {"features": self.features[split_name][batch["index"]], "labels": batch["labels"],
            "weights": batch["weights"]}

  def logits(self, model, params, batch, *, rng, deterministic):
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    if "features" in batch or self.frozen_encoder:
      features = batch["features"] if "features" in batch else model.apply(
          params, batch["input_ids"], batch["attention_mask"], method="features",
          **pipeline.token_types(batch))
      return model.apply(params, features, method="classify", deterministic=deterministic,
                         rngs=rngs)
    return model.apply(params, batch["input_ids"], batch["attention_mask"],
                       deterministic=deterministic, rngs=rngs,
                       **pipeline.token_types(batch)).logits

  def loss(self, model, params, objective_params, refs, batch, *, rng, deterministic,
           normalizer):
    del objective_params, refs
    logits = self.logits(model, params, batch, rng=rng, deterministic=deterministic)
    return self.hard_loss(logits, batch, normalizer)

  def forward(self, model, params, batch, *, rng, deterministic):
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    return model.apply(params, batch["input_ids"], batch["attention_mask"],
                       deterministic=deterministic, rngs=rngs, **pipeline.token_types(batch))

  def hard_loss(self, logits, batch, normalizer):
    return cross_entropy(logits, batch["labels"], batch["weights"], normalizer)[:2]

  def logit_weights(self, batch):
    return batch["weights"]

  def token_weights(self, batch):
    mask = batch["attention_mask"].astype(jnp.float32)
    return mask / jnp.maximum(mask.sum(-1, keepdims=True), 1.0) * batch["weights"][:, None]

  def eval_outputs(self, model, params, objective_params, refs, batch):
    del objective_params, refs
    logits = self.logits(model, params, batch, rng=None, deterministic=True)
    loss_sum, _, _ = cross_entropy(logits, batch["labels"], batch["weights"], 1.0)
    return {"loss_sum": loss_sum, "predictions": logits.argmax(-1), "labels": batch["labels"],
            "weights": batch["weights"]}

  def eval_metrics(self, outputs):
    real = np.concatenate([o["weights"] for o in outputs]) > 0
    predictions = np.concatenate([o["predictions"] for o in outputs])[real]
    labels = np.concatenate([o["labels"] for o in outputs])[real]
    loss_sum = float(sum(o["loss_sum"] for o in outputs))
    return metrics.classification(predictions, labels, loss_sum, self.num_labels)


def text_data(config, tokenizer, *, num_labels: int) -> base.Data:
  """Labelled text (`data.text_column`, `data.label_column` in [0, num_labels)) as
  length-bucketed batches: the data of any sequence-level objective."""
  c = config

  def load(split_name, max_examples=0):
    dataset = sources.load_split(c.data, split_name)
    if max_examples:
      dataset = dataset.select(range(min(max_examples, len(dataset))))
    return pipeline.tokenize_split(dataset, c.data, tokenizer, num_labels=num_labels)

  train_split = load(c.data.train_split)
  eval_splits = {name: load(name, c.eval.max_examples) for name in c.eval.splits}
  buckets = pipeline.bucket_lengths(train_split.lengths, c.data)
  steps_per_epoch = pipeline.steps_per_epoch(
      train_split, global_batch_size=c.training.batch_size, buckets=buckets)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  def train_iterator(num_steps):
    return pipeline.train_iterator(
        train_split, global_batch_size=c.training.batch_size, buckets=buckets, seed=c.seed,
        num_epochs=math.ceil(num_steps / steps_per_epoch), process_index=jax.process_index(),
        process_count=jax.process_count(), pad_id=pad_id)

  def eval_batches(split_name):
    return pipeline.eval_batches(
        eval_splits[split_name], global_batch_size=c.eval.batch_size, buckets=buckets,
        process_index=jax.process_index(), process_count=jax.process_count(), pad_id=pad_id)

  return base.Data(train_split=train_split, eval_splits=eval_splits, buckets=buckets,
                   steps_per_epoch=int(steps_per_epoch), pad_id=pad_id,
                   train_iterator=train_iterator, eval_batches=eval_batches)


def cross_entropy(logits, labels, weights, normalizer):
  """(weighted CE sum / normalizer, {correct, weight} sums, the weighted CE of each label)."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights
  loss = ce.sum() / jnp.maximum(normalizer, 1.0)
  sums = {"correct": ((logits.argmax(-1) == labels) * weights).sum(), "weight": weights.sum()}
  return loss, sums, ce


def _cached_features(run) -> dict:
  """Every split's head inputs (see `ftjax.feature_cache`)."""
  outside_head = [p for p, label in run.path_labels.items()
                  if label == partition.TRAINABLE and not p.startswith(partition.HEAD_PREFIXES)]
  if outside_head:
    raise FtjaxError(
        f"strategy.cache_features=True needs every parameter before the head frozen, but "
        f"{outside_head[0]!r} is trainable (new in the checkpoint, or by strategy.rules); "
        f"set --config.strategy.cache_features=False")
  state, out, hits = run.initial_state, {}, []
  splits = {run.config.data.train_split: run.train_split, **run.eval_splits}
  step = feature_cache.feature_step(run.model, state.trainable, state.frozen, config=run.config,
                                    mesh=run.mesh)
  for name, split in splits.items():
    key = feature_cache.cache_key(run.config, name, split)
    compute = functools.partial(
        feature_cache.features, step, state.trainable, state.frozen, split,
        config=run.config, mesh=run.mesh, buckets=run.buckets, pad_id=run.pad_id)
    out[name], hit = feature_cache.load_or_compute(run.feature_cache_dir, key, compute)
    hits.append(f"{name} {'cached' if hit else 'computed'}")
  logging.info("head-only on cached features (%s); cache: %s", "; ".join(hits),
               run.feature_cache_dir or "memory only")
  return out
