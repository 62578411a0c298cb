"""Preference tuning of a causal LM: DPO (sigmoid, IPO, hinge, cDPO), SimPO and ORPO.

  config.objective.name = "preference"
  config.objective.loss = "dpo"           # "dpo" | "simpo" | "orpo"
  config.objective.dpo_loss = "sigmoid"   # "sigmoid" | "ipo" | "hinge"
  config.objective.beta = 0.1
  config.objective.reference = ""         # "" (automatic) | "adapters_off" | "copy" | a model

Data are preference pairs (`ftjax.data.preference`, batches (pairs, 2,
length)); the losses are `ftjax.objectives.preference_losses` of the
responses' summed token log-probabilities.

The DPO reference (SimPO and ORPO need none):

  * "adapters_off": the policy's own base with its adapters switched off,
    i.e. the model built without the trained adapters (a quantised base
    stays quantised) applied to the same frozen arrays: **no extra weights**.
    The default when `strategy.name` is an adapter (LoRA, DoRA, IA3, prompt,
    prefix, bottleneck), whose base is frozen.
  * "copy": a frozen copy of `model.name_or_path` loaded as a reference model
    (`base.Reference`: no gradients, no optimizer state, not checkpointed);
    the default for full or partial fine-tuning.
  * any other value: that model (folder, hub id, GGUF file or ftjax run) as
    the frozen reference; it must share the tokenizer.

Metrics (train and eval): `reward_accuracy` (chosen reward > rejected reward),
`reward_margin`, `rewards/chosen`, `rewards/rejected` (beta times the
policy-reference log-ratio for DPO; SimPO's and ORPO's own), `logps/chosen`,
`logps/rejected` (summed over response tokens) and `kl`, the implicit
sequence KL estimate: the policy-reference log-ratio averaged over the chosen
and rejected responses (DPO only).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax import models
from ftjax.core import sources
from ftjax.data import batching, preference
from ftjax.errors import ConfigError
from ftjax.models import keymap
from ftjax.objectives import base
from ftjax.objectives import preference_losses as pl
from ftjax.peft import adapter as adapter_lib

LOSSES = ("dpo", "simpo", "orpo")
REFERENCE_MODES = ("", "adapters_off", "copy")


def sequence_logps(logits, targets, weights):
  """(rows,) summed log-probabilities of `targets` where `weights` (rows, length) are 1."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return (token * weights).sum(-1)


def base_model_of(model: models.Model) -> models.Model:
  """`model` without its trained adapters (a base-transforming one, a quantised
  kernel, stays): the DPO reference at no extra weights."""
  kept = tuple(a for a in model.adapters if getattr(a, "transforms_base", False))
  return models.Model.build(model.config, adapters=kept)


class Preference(base.Objective):
  """See the module docstring."""

  name = "preference"
  head = "causal_lm"
  metrics = ("loss", "reward_accuracy", "reward_margin", "kl")
  references = ("reference",)

  @classmethod
  def config(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.loss = "dpo"
    # DPO's loss on the margin h of log-ratios: "sigmoid" (DPO; cDPO with
    # label_smoothing > 0), "ipo" or "hinge" (SLiC).
    c.dpo_loss = "sigmoid"
    # DPO/IPO/hinge's beta; SimPO's beta (its paper uses about 2); ORPO's lambda.
    c.beta = 0.1
    c.label_smoothing = 0.0
    # SimPO's target margin gamma.
    c.gamma = 0.5
    # "" (adapters_off for an adapter strategy, else copy), "adapters_off", "copy",
    # or a model (folder, hub id, GGUF, ftjax run) to use as the reference.
    c.reference = ""
    return c

  @classmethod
  def check_config(cls, config) -> None:
    o = config.objective
    if o.loss not in LOSSES:
      raise ConfigError(f"config key 'objective.loss' is {o.loss!r}; expected one of {LOSSES}")
    if o.dpo_loss not in pl.DPO_LOSSES:
      raise ConfigError(f"config key 'objective.dpo_loss' is {o.dpo_loss!r}; expected one of "
                        f"{pl.DPO_LOSSES}")
    if not o.beta > 0:
      raise ConfigError(f"config key 'objective.beta' is {o.beta!r}; expected a number > 0")
    if not 0 <= o.label_smoothing < 0.5:
      raise ConfigError(f"config key 'objective.label_smoothing' is {o.label_smoothing!r}; "
                        f"expected a number in [0, 0.5)")
    if config.model.task != "causal_lm":
      raise ConfigError(f"objective.name='preference' trains a causal LM; model.task is "
                        f"{config.model.task!r}, expected 'causal_lm'")
    if o.reference == "adapters_off" and config.strategy.name not in adapter_lib.strategy_names():
      raise ConfigError(f"objective.reference='adapters_off' needs an adapter strategy (one of "
                        f"{adapter_lib.strategy_names()}); strategy.name is "
                        f"{config.strategy.name!r}, whose base weights train: use 'copy'")

  @staticmethod
  def batch_spec(batch_size: int, length: int) -> dict:
    pair = {k: jax.ShapeDtypeStruct((batch_size, 2, length), d)
            for k, d in (("input_ids", jnp.int32), ("segment_ids", jnp.int32),
                         ("positions", jnp.int32), ("targets", jnp.int32),
                         ("target_weights", jnp.float32))}
    return {**pair, "weights": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  @property
  def o(self):
    return self.config.objective

  def reference_mode(self) -> str:
    """"adapters_off", "copy", or "model" (objective.reference names one); "none" for
    reference-free losses."""
    if self.o.loss != "dpo":
      return "none"
    if self.o.reference in ("adapters_off", "copy"):
      return self.o.reference
    if self.o.reference:
      return "model"
    return ("adapters_off" if self.config.strategy.name in adapter_lib.strategy_names()
            else "copy")

  # Data.

  def build_data(self, model, tokenizer) -> base.Data:
    c = self.config
    train_split = preference.load_split(c.data, c.data.train_split, tokenizer)
    eval_splits = {name: preference.load_split(c.data, name, tokenizer,
                                               max_examples=c.eval.max_examples)
                   for name in c.eval.splits}
    buckets = batching.bucket_lengths(train_split.lengths, c.data)
    steps = batching.steps_per_epoch(train_split.lengths, global_batch_size=c.training.batch_size,
                                     buckets=buckets)
    if steps == 0:
      raise ConfigError(f"the training split has {len(train_split)} pairs, fewer than one "
                        f"batch of training.batch_size={c.training.batch_size}")
    self.tokenizer = tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return base.Data(
        train_split=train_split, eval_splits=eval_splits, buckets=buckets, steps_per_epoch=steps,
        pad_id=pad_id,
        train_iterator=lambda num_steps: preference.train_iterator(
            train_split, global_batch_size=c.training.batch_size, buckets=buckets, seed=c.seed,
            num_steps=num_steps),
        eval_batches=lambda name: preference.eval_batches(
            eval_splits[name], global_batch_size=c.eval.batch_size, buckets=buckets))

  def host_batch(self, split_name, batch):
    del split_name
    return {k: v for k, v in batch.items() if k != "pair_ids"}

  # The reference.

  def load_references(self, model, tokenizer, shardings):
    mode = self.reference_mode()
    self.reference_model = None
    if mode == "none":
      return {}
    if mode == "adapters_off":
      self.reference_model = base_model_of(model)
      self._reference_paths = frozenset(keymap.flatten(self.reference_model.abstract_params))
      return {}
    m = self.config.model
    name = m.name_or_path if mode == "copy" else self.o.reference
    source = sources.load(name, task="causal_lm", dtype=m.dtype, allow_pickle=m.allow_pickle,
                          seed=self.config.seed, shardings=shardings,
                          adapters=sources.base_adapters(model.adapters))
    if source.model.config.vocab_size != model.config.vocab_size:
      raise ConfigError(f"objective.reference {name!r} has a vocabulary of "
                        f"{source.model.config.vocab_size}; the policy's is "
                        f"{model.config.vocab_size}: expected the same tokenizer")
    self.reference_model = source.model
    return {"reference": base.Reference(source.model, source.params,
                                        {"reference": name, **source.identity})}

  def reference_params(self, params, refs):
    """The reference's parameters: the policy's own base arrays (adapters off) or the
    reference model's."""
    if "reference" in refs:
      return refs["reference"]
    flat = {p: v for p, v in keymap.flatten(params).items() if p in self._reference_paths}
    return jax.lax.stop_gradient(keymap.unflatten(flat, self.reference_model.abstract_params))

  # Loss.

  def _logps(self, model, params, batch, *, rng, deterministic):
    """(pairs, 2) summed response log-probabilities and (pairs, 2) response lengths."""
    flat = {k: batch[k].reshape(-1, batch[k].shape[-1])
            for k in ("input_ids", "segment_ids", "positions", "targets", "target_weights")}
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    logits = model.apply(params, flat["input_ids"], segment_ids_bt=flat["segment_ids"],
                         positions_bt=flat["positions"], deterministic=deterministic,
                         rngs=rngs).logits
    logps = sequence_logps(logits, flat["targets"], flat["target_weights"])
    return logps.reshape(-1, 2), batch["target_weights"].sum(-1)

  def pair_losses(self, model, params, refs, batch, *, rng, deterministic):
    """(per-pair losses, per-pair quantities for the metrics)."""
    o = self.o
    logps, lengths = self._logps(model, params, batch, rng=rng, deterministic=deterministic)
    logp_c, logp_r = logps[:, 0], logps[:, 1]
    out = {"logp_c": logp_c, "logp_r": logp_r}
    if o.loss == "dpo":
      ref_logps, _ = self._logps(self.reference_model, self.reference_params(params, refs),
                                 batch, rng=None, deterministic=True)
      ref_logps = jax.lax.stop_gradient(ref_logps)
      losses, reward_c, reward_r = pl.dpo(logp_c, logp_r, ref_logps[:, 0], ref_logps[:, 1],
                                          beta=o.beta, loss_type=o.dpo_loss,
                                          label_smoothing=o.label_smoothing)
      out["kl"] = ((logps - ref_logps).sum(-1)) / 2
    elif o.loss == "simpo":
      losses, reward_c, reward_r = pl.simpo(logp_c, logp_r, lengths[:, 0], lengths[:, 1],
                                            beta=o.beta, gamma=o.gamma)
    else:
      losses, _, reward_c, reward_r = pl.orpo(logp_c, logp_r, lengths[:, 0], lengths[:, 1],
                                              lam=o.beta)
    return losses, {**out, "reward_c": reward_c, "reward_r": reward_r}

  def _sums(self, losses, q, weights):
    sums = {"weight": weights.sum(), "correct": ((q["reward_c"] > q["reward_r"]) * weights).sum(),
            "margin_sum": ((q["reward_c"] - q["reward_r"]) * weights).sum(),
            "reward_c_sum": (q["reward_c"] * weights).sum(),
            "reward_r_sum": (q["reward_r"] * weights).sum(),
            "logp_c_sum": (q["logp_c"] * weights).sum(),
            "logp_r_sum": (q["logp_r"] * weights).sum()}
    if "kl" in q:
      sums["kl_sum"] = (q["kl"] * weights).sum()
    return (losses * weights).sum(), sums

  def loss(self, model, params, objective_params, refs, batch, *, rng, deterministic,
           normalizer):
    del objective_params
    losses, q = self.pair_losses(model, params, refs, batch, rng=rng,
                                 deterministic=deterministic)
    loss_sum, sums = self._sums(losses, q, batch["weights"])
    return loss_sum / normalizer, sums

  def step_metrics(self, sums):
    return _ratios(sums)

  def eval_outputs(self, model, params, objective_params, refs, batch):
    del objective_params
    losses, q = self.pair_losses(model, params, refs, batch, rng=None, deterministic=True)
    loss_sum, sums = self._sums(losses, q, batch["weights"])
    return {"loss_sum": loss_sum, **sums}

  def eval_metrics(self, outputs):
    sums = {key: np.sum([np.asarray(o[key]) for o in outputs]) for key in outputs[0]}
    metrics = {k: float(v) for k, v in _ratios(sums).items()}
    metrics["loss"] = float(sums["loss_sum"]) / max(float(sums["weight"]), 1.0)
    metrics["num_pairs"] = int(sums["weight"])
    return metrics


def _ratios(sums) -> dict:
  n = jnp.maximum(sums["weight"], 1.0)
  out = {"reward_accuracy": sums["correct"] / n, "reward_margin": sums["margin_sum"] / n,
         "rewards/chosen": sums["reward_c_sum"] / n, "rewards/rejected": sums["reward_r_sum"] / n,
         "logps/chosen": sums["logp_c_sum"] / n, "logps/rejected": sums["logp_r_sum"] / n}
  if "kl_sum" in sums:
    out["kl"] = sums["kl_sum"] / n
  return out
