"""The losses of preference tuning, as pure functions of sequence log-probabilities.

Every function takes per-pair arrays of shape (pairs,) and returns per-pair
losses (the objective weighs and averages them) and the per-pair quantities
the metrics need. Notation, as in TRL and the papers:

  logp_c, logp_r        the policy's summed log-probability of the chosen and
                        rejected response tokens given the prompt
  ref_c, ref_r          the same under the reference model
  h = (logp_c - ref_c) - (logp_r - ref_r)     the implicit reward margin / beta

  dpo      sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
           (Rafailov et al. 2023; eps > 0 is conservative DPO, "cDPO", label
           smoothing as TRL's `label_smoothing`)
  ipo      (h - 1 / (2 beta))^2                       (Azar et al. 2023)
  hinge    max(0, 1 - beta h)                          (SLiC, Zhao et al. 2023)
  simpo    -log sigma(beta (logp_c / |c| - logp_r / |r|) - gamma)
           reference-free, length-normalised (Meng et al. 2024)
  orpo     NLL(chosen) / |c| - lambda log sigma(log odds_c - log odds_r),
           odds = p / (1 - p) of the length-normalised probability p
           (Hong et al. 2024; TRL's `beta` is lambda)
  bradley_terry  -log sigma(r_c - r_r) of a reward model's scalars

The DPO implicit rewards are beta (logp - ref) per response.
"""

import jax
import jax.numpy as jnp

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo(logp_c, logp_r, ref_c, ref_r, *, beta: float, loss_type: str = "sigmoid",
        label_smoothing: float = 0.0):
  """Per-pair DPO-family losses and the chosen/rejected implicit rewards."""
  margin = (logp_c - ref_c) - (logp_r - ref_r)
  if loss_type == "sigmoid":
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * margin)
              - label_smoothing * jax.nn.log_sigmoid(-beta * margin))
  elif loss_type == "ipo":
    losses = (margin - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - beta * margin)
  else:
    raise ValueError(f"loss_type {loss_type!r}; expected one of {DPO_LOSSES}")
  return losses, beta * (logp_c - ref_c), beta * (logp_r - ref_r)


def simpo(logp_c, logp_r, len_c, len_r, *, beta: float, gamma: float):
  """Per-pair SimPO losses and its rewards beta * mean token log-probability."""
  reward_c = beta * logp_c / len_c
  reward_r = beta * logp_r / len_r
  return -jax.nn.log_sigmoid(reward_c - reward_r - gamma), reward_c, reward_r


def log_odds(mean_logp):
  """log(p / (1 - p)) of p = exp(mean_logp) < 1, stably: mean_logp - log(1 - exp(mean_logp))."""
  return mean_logp - jnp.log(-jnp.expm1(jnp.minimum(mean_logp, -1e-7)))


def orpo(logp_c, logp_r, len_c, len_r, *, lam: float):
  """Per-pair ORPO losses (SFT on the chosen + lambda * odds-ratio loss), the odds-ratio
  term alone, and the rewards lambda * mean log-probability (as TRL logs them)."""
  mean_c, mean_r = logp_c / len_c, logp_r / len_r
  ratio_loss = -jax.nn.log_sigmoid(log_odds(mean_c) - log_odds(mean_r))
  return -mean_c + lam * ratio_loss, ratio_loss, lam * mean_c, lam * mean_r


def bradley_terry(reward_c, reward_r):
  """Per-pair Bradley-Terry losses -log sigma(r_c - r_r)."""
  return -jax.nn.log_sigmoid(reward_c - reward_r)
