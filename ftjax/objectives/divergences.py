"""The distances distillation minimises (`ftjax.objectives.distill`), on logits divided by T.

Forward KL(teacher || student), reverse KL, and the generalised
Jensen-Shannon divergence of GKD (mixture beta * teacher + (1 - beta) *
student, TRL's convention); the same over k + 1 outcomes (a teacher's top-k
tokens and "the rest", what the decoder cache keeps); per-token hidden-state
distances.
"""

import math

import jax
import jax.numpy as jnp

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
HIDDEN_LOSSES = ("mse", "cosine")


def divergence(student, teacher, kind: str, beta: float) -> jax.Array:
  """D(teacher, student) over the last axis of two logit arrays (already divided by T)."""
  ls = jax.nn.log_softmax(student, axis=-1)
  lt = jax.nn.log_softmax(teacher, axis=-1)
  return _divergence(ls, lt, kind, beta)


def _divergence(ls, lt, kind, beta):
  """D between two log-distributions over the last axis (finite log-probabilities)."""
  if kind == "forward_kl":
    return (jnp.exp(lt) * (lt - ls)).sum(-1)
  if kind == "reverse_kl":
    return (jnp.exp(ls) * (ls - lt)).sum(-1)
  lm = jnp.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
  return (beta * (jnp.exp(lt) * (lt - lm)).sum(-1)
          + (1 - beta) * (jnp.exp(ls) * (ls - lm)).sum(-1))


def teacher_summary(teacher, k: int):
  """(top-k logits, their indices, log-sum-exp of the other logits) of logits divided by T.

  With k >= the vocabulary there is no "rest": its log-sum-exp is -inf.
  """
  k = min(k, teacher.shape[-1])
  values, indices = jax.lax.top_k(teacher, k)
  return values, indices.astype(jnp.int32), _rest_lse(teacher, indices)


def _rest_lse(logits, indices):
  """log-sum-exp over the last axis of `logits` leaving out `indices`."""
  flat = logits.reshape(-1, logits.shape[-1])
  idx = indices.reshape(-1, indices.shape[-1])
  masked = jax.vmap(lambda row, i: row.at[i].set(-jnp.inf))(flat, idx)
  return jax.nn.logsumexp(masked, axis=-1).reshape(logits.shape[:-1])


def topk_divergence(student, values, indices, rest, kind: str, beta: float) -> jax.Array:
  """D over k + 1 outcomes: the teacher's top-k tokens and "the rest" (see the module docstring).

  With k = the vocabulary (no rest) this is `divergence` over the whole vocabulary.
  """
  ls_all = jax.nn.log_softmax(student, axis=-1)
  ls = jnp.take_along_axis(ls_all, indices, axis=-1)
  lse_t = jnp.logaddexp(jax.nn.logsumexp(values, axis=-1), rest)
  lt = values - lse_t[..., None]
  if indices.shape[-1] < student.shape[-1]:
    ls_rest = _rest_lse(student, indices) - jax.nn.logsumexp(student, axis=-1)
    ls = jnp.concatenate([ls, ls_rest[..., None]], axis=-1)
    lt = jnp.concatenate([lt, (rest - lse_t)[..., None]], axis=-1)
  return _divergence(ls, lt, kind, beta)


def hidden_distance(hs, ht, kind: str) -> jax.Array:
  """Per-token MSE (mean over features) or cosine distance of (..., embed) arrays."""
  if kind == "mse":
    return ((hs - ht) ** 2).mean(-1)
  cos = (hs * ht).sum(-1) / jnp.maximum(
      jnp.linalg.norm(hs, axis=-1) * jnp.linalg.norm(ht, axis=-1), 1e-8)
  return 1.0 - cos
