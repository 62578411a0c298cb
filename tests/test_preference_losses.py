"""Preference losses against values computed by hand (math, not ftjax)."""

import math

import numpy as np
import pytest

from ftjax.objectives import preference_losses as pl


def _sig(x):
  return 1.0 / (1.0 + math.exp(-x))


# One pair: policy log-probs of chosen/rejected, reference log-probs.
LOGP_C, LOGP_R, REF_C, REF_R = -10.0, -12.0, -11.0, -11.5
MARGIN = (LOGP_C - REF_C) - (LOGP_R - REF_R)  # 1.0 - (-0.5) = 1.5


def _one(x):
  return np.asarray([x], np.float32)


def test_dpo_sigmoid_by_hand():
  beta = 0.1
  losses, rc, rr = pl.dpo(_one(LOGP_C), _one(LOGP_R), _one(REF_C), _one(REF_R), beta=beta)
  assert float(losses[0]) == pytest.approx(-math.log(_sig(beta * 1.5)), rel=1e-6)
  assert float(rc[0]) == pytest.approx(0.1 * 1.0) and float(rr[0]) == pytest.approx(0.1 * -0.5)


def test_dpo_is_log2_when_policy_is_reference():
  x = np.asarray([-3.0, -40.0, -7.5], np.float32)
  y = np.asarray([-9.0, -2.0, -7.5], np.float32)
  for smoothing in (0.0, 0.2):
    losses, rc, rr = pl.dpo(x, y, x, y, beta=0.5, label_smoothing=smoothing)
    np.testing.assert_allclose(losses, math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(rc - rr, 0.0)


def test_cdpo_ipo_hinge_by_hand():
  beta, eps = 0.2, 0.1
  args = (_one(LOGP_C), _one(LOGP_R), _one(REF_C), _one(REF_R))
  cdpo = pl.dpo(*args, beta=beta, label_smoothing=eps)[0]
  expected = -(1 - eps) * math.log(_sig(beta * MARGIN)) - eps * math.log(_sig(-beta * MARGIN))
  assert float(cdpo[0]) == pytest.approx(expected, rel=1e-6)
  ipo = pl.dpo(*args, beta=beta, loss_type="ipo")[0]
  assert float(ipo[0]) == pytest.approx((MARGIN - 1 / (2 * beta)) ** 2, rel=1e-6)
  hinge = pl.dpo(*args, beta=beta, loss_type="hinge")[0]
  assert float(hinge[0]) == pytest.approx(max(0.0, 1 - beta * MARGIN), rel=1e-6)
  hinge_zero = pl.dpo(*args, beta=1.0, loss_type="hinge")[0]
  assert float(hinge_zero[0]) == 0.0  # 1 - 1.5 < 0


def test_simpo_by_hand():
  beta, gamma = 2.0, 0.5
  losses, rc, rr = pl.simpo(_one(-10.0), _one(-12.0), _one(5.0), _one(4.0), beta=beta,
                            gamma=gamma)
  # rewards 2 * -2 = -4 and 2 * -3 = -6; loss -log sigma(-4 + 6 - 0.5).
  assert float(rc[0]) == pytest.approx(-4.0) and float(rr[0]) == pytest.approx(-6.0)
  assert float(losses[0]) == pytest.approx(-math.log(_sig(1.5)), rel=1e-6)


def test_orpo_by_hand():
  lam = 0.1
  losses, ratio, _, _ = pl.orpo(_one(-2.0), _one(-6.0), _one(4.0), _one(3.0), lam=lam)
  mean_c, mean_r = -0.5, -2.0
  odds_c = math.exp(mean_c) / (1 - math.exp(mean_c))
  odds_r = math.exp(mean_r) / (1 - math.exp(mean_r))
  ratio_expected = -math.log(_sig(math.log(odds_c) - math.log(odds_r)))
  assert float(ratio[0]) == pytest.approx(ratio_expected, rel=1e-5)
  assert float(losses[0]) == pytest.approx(0.5 + lam * ratio_expected, rel=1e-5)


def test_bradley_terry_by_hand():
  losses = pl.bradley_terry(np.asarray([2.0, -1.0], np.float32), np.asarray([0.5, 1.0],
                                                                            np.float32))
  np.testing.assert_allclose(losses, [-math.log(_sig(1.5)), -math.log(_sig(-2.0))], rtol=1e-6)
