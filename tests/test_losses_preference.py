"""Reward and preference losses (reward model, the DPO family, SimPO, CPO, ORPO, KTO) against independent
float64 NumPy re-implementations of the formulas of TRL's RewardTrainer, DPOTrainer, CPOTrainer,
ORPOTrainer and KTOTrainer.

The references below import nothing from jaxalign: each one is written from the formula. jaxalign runs in
the inputs' dtype; the references see the same values promoted to float64. The per-example forms
(`*_losses`: per-example losses and metrics) are what the trainers sum; the public `*_loss` is their mean.
Every function is also checked in float32, bfloat16 (loose tolerance) and float64 (under jax.enable_x64).
"""
import functools

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from jaxalign.losses import (DPO_LOSS_TYPES, cpo_loss, dpo_loss, kto_kl, kto_loss, orpo_loss, reward_loss,
                             reward_losses, simpo_loss)
from jaxalign.losses import preference as P
from tests.test_losses import DTYPE_TOL, DTYPES, as_dtype, assert_dtype, in_dtype

B = 7
SEEDS = [0, 1, 2]
RTOL = ATOL = 1e-5


# ------------------------------------------------------------------------------------ NumPy references

def np_logsig(x):
    """log sigmoid(x) = -log(1 + exp(-x)), stable for any x."""
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sig(x):
    return np.exp(np_logsig(x))


def np_log1mexp(x):
    """log(1 - exp(x)) for x < 0 in float64."""
    x = np.asarray(x, np.float64)
    return np.where(x < -0.5, np.log1p(-np.exp(np.minimum(x, -0.5))), np.log(-np.expm1(np.maximum(x, -0.5))))


def np_reward(rc, rr, margin=None, center_coef=None):
    rc, rr = f64(rc), f64(rr)
    m = 0.0 if margin is None else f64(margin)
    loss = np.mean(-np_logsig(rc - rr - m))
    if center_coef:
        loss += center_coef * np.mean((rc + rr) ** 2)
    return loss, {"accuracy": np.mean(rc > rr), "margin": np.mean(rc - rr), "rewards/chosen": np.mean(rc),
                  "rewards/rejected": np.mean(rr)}


def np_dpo_per_pair(lw, ll, rw, rl, beta, loss_type, eps=0.0, len_w=None, len_l=None):
    """Per-pair losses of TRL's DPO loss types (reverse-KL score s(rho) = rho)."""
    lw, ll, rw, rl = f64(lw), f64(ll), f64(rw), f64(rl)
    rho_w, rho_l = lw - rw, ll - rl
    delta = rho_w - rho_l
    if loss_type == "sigmoid":  # cDPO form; eps = 0 is plain DPO
        return -(1 - eps) * np_logsig(beta * delta) - eps * np_logsig(-beta * delta)
    if loss_type == "robust":
        return (-(1 - eps) * np_logsig(beta * delta) + eps * np_logsig(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * delta)
    if loss_type == "ipo":
        return (rho_w / f64(len_w) - rho_l / f64(len_l) - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -np_logsig(beta * (rho_w / f64(len_w) - rho_l / f64(len_l)))
    if loss_type == "exo_pair":
        eps = eps if eps > 0 else 1e-3  # TRL sets label_smoothing = 1e-3 when it is 0
        q_w, q_l = np_sig(beta * delta), np_sig(-beta * delta)
        log_q_w, log_q_l = np_logsig(beta * delta), np_logsig(-beta * delta)
        return q_w * (log_q_w - np.log(1 - eps)) + q_l * (log_q_l - np.log(eps))
    if loss_type == "nca_pair":
        return -np_logsig(beta * rho_w) - 0.5 * np_logsig(-beta * rho_w) - 0.5 * np_logsig(-beta * rho_l)
    if loss_type == "bco_pair":
        return -np_logsig(beta * rho_w) - np_logsig(-beta * rho_l)
    if loss_type == "sppo_hard":
        return (rho_w - 1 / (2 * beta)) ** 2 + (rho_l + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - np_sig(beta * rho_w)) + np_sig(beta * rho_l)
    if loss_type == "apo_down":
        return np_sig(beta * rho_w) + (1 - np_sig(beta * delta))
    raise AssertionError(loss_type)


def np_dpo_metrics(lw, ll, rw, rl, beta):
    """TRL's logged DPO metrics."""
    lw, ll, rw, rl = f64(lw), f64(ll), f64(rw), f64(rl)
    cr, rr = beta * (lw - rw), beta * (ll - rl)
    return {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (cr - rr).mean(),
            "rewards/accuracies": (cr > rr).mean(), "logps/chosen": lw.mean(), "logps/rejected": ll.mean()}


def np_simpo(aw, al, beta, gamma, eps=0.0):
    """TRL CPOTrainer loss_type="simpo": logits = (a_w - a_l) - gamma / beta, cDPO form on beta * logits."""
    aw, al = f64(aw), f64(al)
    logits = (aw - al) - gamma / beta
    losses = -(1 - eps) * np_logsig(beta * logits) - eps * np_logsig(-beta * logits)
    cr, rr = beta * aw, beta * al
    return losses.mean(), {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
                           "rewards/margins": (cr - rr).mean(), "rewards/accuracies": (cr > rr).mean()}


def np_cpo(lw, ll, nll, beta, alpha):
    lw, ll, nll = f64(lw), f64(ll), f64(nll)
    losses = -np_logsig(beta * (lw - ll)) + alpha * nll
    cr, rr = beta * lw, beta * ll
    return losses.mean(), {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
                           "rewards/margins": (cr - rr).mean(), "rewards/accuracies": (cr > rr).mean(),
                           "nll_loss": nll.mean()}


def np_orpo(aw, al, nll, lam):
    """TRL ORPOTrainer.odds_ratio_loss: loss = NLL - lam * mean(log sigmoid(log odds))."""
    aw, al, nll = f64(aw), f64(al), f64(nll)
    log_odds = (aw - al) - (np_log1mexp(aw) - np_log1mexp(al))
    ratio = np_logsig(log_odds)
    loss = nll.mean() - lam * ratio.mean()
    cr, rr = lam * aw, lam * al
    return loss, {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (cr - rr).mean(),
                  "rewards/accuracies": (cr > rr).mean(), "log_odds_ratio": ratio.mean(),
                  "log_odds_chosen": log_odds.mean(), "nll_loss": nll.mean()}


def np_kto(logps, ref, desirable, kl, beta, wd, wu):
    """TRL KTOTrainer: nanmean(cat(wd * L_D, wu * L_U)); rewards are beta * rho averaged per class."""
    logps, ref, kl = f64(logps), f64(ref), float(kl)
    desirable = np.asarray(desirable, bool)
    rho = logps - ref
    l_d = wd * (1 - np_sig(beta * (rho[desirable] - kl)))
    l_u = wu * (1 - np_sig(beta * (kl - rho[~desirable])))
    loss = np.concatenate([l_d, l_u]).mean()
    r = beta * rho
    return loss, {"kl": kl, "rewards/chosen": r[desirable].mean() if desirable.any() else 0.0,
                  "rewards/rejected": r[~desirable].mean() if (~desirable).any() else 0.0}


def np_kto_kl(kl_logps, kl_ref, weight=None):
    diff = f64(kl_logps) - f64(kl_ref)
    if weight is not None:
        diff = diff[np.asarray(weight) > 0]
    return max(0.0, diff.mean()) if diff.size else 0.0


# ------------------------------------------------------------------------------------------- helpers

def f64(x):
    return np.asarray(x, np.float64)


def close(got, want, rtol=RTOL, atol=ATOL, err_msg=""):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol, err_msg=err_msg)


def check_metrics(got, want, rtol=RTOL, atol=ATOL):
    for k, v in want.items():
        assert k in got, f"metric {k!r} missing from {sorted(got)}"
        close(got[k], v, rtol, atol, err_msg=k)


def summed_inputs(seed):
    """Summed completion log-probs (policy and reference close to each other), lengths."""
    rng = np.random.default_rng(seed)
    lw = -rng.uniform(5, 60, B)
    ll = -rng.uniform(5, 60, B)
    rw = lw + rng.normal(0, 3, B)
    rl = ll + rng.normal(0, 3, B)
    lw, ll, rw, rl = (np.minimum(x, -0.5).astype(np.float32) for x in (lw, ll, rw, rl))
    len_w = rng.integers(3, 40, B).astype(np.int32)
    len_l = rng.integers(3, 40, B).astype(np.int32)
    return lw, ll, rw, rl, len_w, len_l


def avg_inputs(seed):
    rng = np.random.default_rng(seed + 100)
    return (-rng.uniform(0.1, 3, B)).astype(np.float32), (-rng.uniform(0.1, 3, B)).astype(np.float32)


def j(*xs):
    return [jnp.asarray(x) for x in xs]


# ------------------------------------------------------------------------------------------- reward

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center_coef", [None, 0.01])
def test_reward_loss_matches_numpy(seed, with_margin, center_coef):
    rng = np.random.default_rng(seed)
    rc = rng.normal(0.5, 2.0, B).astype(np.float32)
    rr = rng.normal(-0.5, 2.0, B).astype(np.float32)
    margin = rng.uniform(0, 2, B).astype(np.float32) if with_margin else None
    loss, metrics = reward_loss(*j(rc, rr), None if margin is None else jnp.asarray(margin), center_coef)
    want, want_metrics = np_reward(rc, rr, margin, center_coef)
    close(loss, want)
    check_metrics(metrics, want_metrics)


def test_reward_loss_margin_and_center_change_the_value():
    rc, rr = np.array([1.0, 0.5, 2.0], np.float32), np.array([0.0, 1.0, -1.0], np.float32)
    base, _ = reward_loss(*j(rc, rr))
    with_m, _ = reward_loss(*j(rc, rr), jnp.ones(3))
    with_c, _ = reward_loss(*j(rc, rr), None, 0.01)
    assert float(with_m) > float(base) and float(with_c) > float(base)
    close(with_c - base, 0.01 * np.mean((f64(rc) + f64(rr)) ** 2))


def test_reward_loss_gradient():
    rc, rr = np.array([1.0, 0.5, 2.0, -3.0], np.float32), np.array([0.0, 1.0, -1.0, 0.5], np.float32)
    g_c, g_r = jax.grad(lambda a, b: reward_loss(a, b)[0], argnums=(0, 1))(*j(rc, rr))
    want = -np_sig(-(f64(rc) - f64(rr))) / len(rc)
    close(g_c, want)
    close(g_r, -want)


# ---------------------------------------------------------------------------------------------- DPO

DPO_CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0),
             ("sigmoid_norm", 0.0), ("exo_pair", 0.0), ("exo_pair", 1e-2), ("nca_pair", 0.0), ("bco_pair", 0.0),
             ("sppo_hard", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0)]
LENGTH_NORMALISED = ("ipo", "sigmoid_norm")


def test_dpo_cases_cover_every_loss_type():
    assert {t for t, _ in DPO_CASES} == set(DPO_LOSS_TYPES)


def _dpo_kwargs(loss_type, eps, beta, len_w, len_l):
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
    if loss_type in LENGTH_NORMALISED:
        kw.update(chosen_lengths=jnp.asarray(len_w), rejected_lengths=jnp.asarray(len_l))
    return kw


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type,eps", DPO_CASES)
def test_dpo_loss_matches_numpy(loss_type, eps, beta, seed):
    lw, ll, rw, rl, len_w, len_l = summed_inputs(seed)
    kw = _dpo_kwargs(loss_type, eps, beta, len_w, len_l)
    loss, metrics = dpo_loss(*j(lw, ll, rw, rl), **kw)
    per_pair, per_pair_metrics = P.dpo_losses(*j(lw, ll, rw, rl), **kw)
    want = np_dpo_per_pair(lw, ll, rw, rl, beta, loss_type, eps, len_w, len_l)
    assert per_pair.shape == (B,)
    close(per_pair, want)
    close(P.dpo_type_losses(*j(lw, ll, rw, rl), **kw), want)
    close(loss, want.mean())
    check_metrics(metrics, np_dpo_metrics(lw, ll, rw, rl, beta))
    assert all(v.shape == (B,) for v in per_pair_metrics.values())


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type,eps", DPO_CASES)
def test_dpo_loss_gradient_matches_numpy_finite_differences(loss_type, eps, beta):
    """d mean-loss / d (chosen, rejected) log-probs vs central differences of the float64 reference."""
    lw, ll, rw, rl, len_w, len_l = summed_inputs(3)
    kw = _dpo_kwargs(loss_type, eps, beta, len_w, len_l)
    g_w, g_l = jax.grad(lambda a, b: dpo_loss(a, b, *j(rw, rl), **kw)[0], argnums=(0, 1))(*j(lw, ll))

    def ref(a, b):
        return np_dpo_per_pair(a, b, rw, rl, beta, loss_type, eps, len_w, len_l).mean()

    h = 1e-5
    for got, which in ((g_w, 0), (g_l, 1)):
        fd = np.zeros(B)
        for i in range(B):
            args_p = [f64(lw).copy(), f64(ll).copy()]
            args_m = [f64(lw).copy(), f64(ll).copy()]
            args_p[which][i] += h
            args_m[which][i] -= h
            fd[i] = (ref(*args_p) - ref(*args_m)) / (2 * h)
        close(got, fd, rtol=1e-4, atol=1e-5, err_msg=f"d/d{'chosen' if which == 0 else 'rejected'}")


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_gradient_analytic(beta):
    lw, ll, rw, rl, _, _ = summed_inputs(4)
    delta = (f64(lw) - f64(rw)) - (f64(ll) - f64(rl))
    g_w, g_l, g_rw = jax.grad(lambda a, b, c: dpo_loss(a, b, c, jnp.asarray(rl), beta=beta)[0],
                              argnums=(0, 1, 2))(*j(lw, ll, rw))
    want = -beta * np_sig(-beta * delta) / B
    close(g_w, want)
    close(g_l, -want)
    close(g_rw, -want)


def test_dpo_sigmoid_zero_smoothing_equals_robust_zero():
    lw, ll, rw, rl, _, _ = summed_inputs(5)
    a, _ = dpo_loss(*j(lw, ll, rw, rl), beta=0.1, loss_type="sigmoid")
    b, _ = dpo_loss(*j(lw, ll, rw, rl), beta=0.1, loss_type="robust", label_smoothing=0.0)
    close(a, float(b))


def test_dpo_equal_policy_and_reference_gives_log2():
    x = -np.linspace(5, 60, B).astype(np.float32)
    loss, m = dpo_loss(*j(x, x - 3, x, x - 3), beta=0.1)
    close(loss, np.log(2.0))
    close(m["rewards/margins"], 0.0)
    close(m["rewards/accuracies"], 0.0)  # strict >: ties are not counted as correct


@pytest.mark.parametrize("loss_type", LENGTH_NORMALISED)
def test_dpo_length_normalised_without_lengths_raises(loss_type):
    lw, ll, rw, rl, len_w, _ = summed_inputs(0)
    with pytest.raises(ValueError):
        dpo_loss(*j(lw, ll, rw, rl), loss_type=loss_type)
    with pytest.raises(ValueError):
        dpo_loss(*j(lw, ll, rw, rl), loss_type=loss_type, chosen_lengths=jnp.asarray(len_w))


def test_dpo_unknown_loss_type_raises():
    lw, ll, rw, rl, _, _ = summed_inputs(0)
    with pytest.raises(ValueError):
        dpo_loss(*j(lw, ll, rw, rl), loss_type="not_a_loss")


# -------------------------------------------------------------------------------------------- SimPO

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_loss_matches_numpy(seed, eps):
    aw, al = avg_inputs(seed)
    loss, metrics = simpo_loss(*j(aw, al), beta=2.0, gamma=0.5, label_smoothing=eps)
    want, want_metrics = np_simpo(aw, al, 2.0, 0.5, eps)
    close(loss, want)
    check_metrics(metrics, want_metrics)
    # TRL's (a_w - a_l) - gamma/beta inside beta * (.) equals beta * (a_w - a_l) - gamma
    z = 2.0 * (f64(aw) - f64(al)) - 0.5
    close(loss, np.mean(-(1 - eps) * np_logsig(z) - eps * np_logsig(-z)))


def test_simpo_defaults_are_beta2_gamma05():
    aw, al = avg_inputs(7)
    close(simpo_loss(*j(aw, al))[0], np_simpo(aw, al, 2.0, 0.5)[0])


# ---------------------------------------------------------------------------------------------- CPO

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta,alpha", [(0.1, 1.0), (0.5, 0.0), (0.1, 0.5)])
def test_cpo_loss_matches_numpy(seed, beta, alpha):
    lw, ll, _, _, len_w, _ = summed_inputs(seed)
    nll = (-f64(lw) / len_w).astype(np.float32)
    loss, metrics = cpo_loss(*j(lw, ll, nll), beta=beta, alpha=alpha)
    want, want_metrics = np_cpo(lw, ll, nll, beta, alpha)
    close(loss, want)
    check_metrics(metrics, want_metrics)


# --------------------------------------------------------------------------------------------- ORPO

LOG1MEXP_POINTS = np.array([-50.0, -30.0, -10.0, -2.0, -0.7, -0.6931, -0.69315, -0.6932, -0.5, -0.1, -1e-2,
                            -1e-3, -1e-4, -1e-5, -1e-6], np.float32)


def test_log1mexp_matches_high_precision():
    mpmath.mp.dps = 50
    want = np.array([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(float(x))))) for x in LOG1MEXP_POINTS])
    got = P.log1mexp(jnp.asarray(LOG1MEXP_POINTS))
    assert np.all(np.isfinite(np.asarray(got)))
    close(got, want, rtol=1e-5, atol=0)
    close(np_log1mexp(LOG1MEXP_POINTS), want, rtol=1e-12, atol=0)  # the float64 reference used below


def test_log1mexp_gradient():
    got = jax.vmap(jax.grad(P.log1mexp))(jnp.asarray(LOG1MEXP_POINTS))
    want = -1.0 / np.expm1(-f64(LOG1MEXP_POINTS))  # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    assert np.all(np.isfinite(np.asarray(got)))
    close(got, want, rtol=1e-4, atol=1e-30)


def test_log1mexp_gradient_finite_very_close_to_zero():
    x = jnp.asarray([-1e-8, -2e-8], jnp.float32)
    assert np.all(np.isfinite(np.asarray(P.log1mexp(x))))
    g = jax.vmap(jax.grad(P.log1mexp))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    close(g, -1.0 / np.expm1(-f64(x)), rtol=1e-3, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_loss_matches_numpy(seed, lam):
    aw, al = avg_inputs(seed)
    nll = (-aw).astype(np.float32)
    loss, metrics = orpo_loss(*j(aw, al, nll), lam=lam)
    want, want_metrics = np_orpo(aw, al, nll, lam)
    close(loss, want)
    check_metrics(metrics, want_metrics)


@pytest.mark.parametrize("regime", ["near_zero", "very_negative", "mixed"])
def test_orpo_loss_stable_at_extreme_avg_logps(regime):
    rng = np.random.default_rng(11)
    if regime == "near_zero":
        aw = -rng.uniform(1e-5, 1e-3, B)
        al = -rng.uniform(1e-5, 1e-3, B)
        aw[0], al[1] = -1e-4, -1e-4
    elif regime == "very_negative":
        aw = -rng.uniform(20, 40, B)
        al = -rng.uniform(20, 40, B)
        aw[0], al[1] = -30.0, -30.0
    else:
        aw = np.array([-1e-4, -30, -1e-4, -30, -1e-3, -5, -0.69])
        al = np.array([-30, -1e-4, -1e-4, -30, -20, -1e-5, -0.7])
    aw, al = aw.astype(np.float32), al.astype(np.float32)
    nll = (-aw).astype(np.float32)
    loss, metrics = orpo_loss(*j(aw, al, nll), lam=0.1)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    want, want_metrics = np_orpo(aw, al, nll, 0.1)
    close(loss, want)
    check_metrics(metrics, want_metrics)
    g_w, g_l = jax.grad(lambda a, b: orpo_loss(a, b, jnp.asarray(nll), lam=0.1)[0], argnums=(0, 1))(*j(aw, al))
    assert np.all(np.isfinite(np.asarray(g_w))) and np.all(np.isfinite(np.asarray(g_l)))
    # analytic: d/da_l [-lam/B * logsig(L)], dL/da_l = -1 - d log1mexp(a_l)/da_l = -1/(1 - e^{a_l})
    log_odds = (f64(aw) - f64(al)) - (np_log1mexp(aw) - np_log1mexp(al))
    close(g_l, -0.1 / B * np_sig(-log_odds) * (-1.0 / -np.expm1(f64(al))), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- KTO

def kto_inputs(seed):
    rng = np.random.default_rng(seed + 200)
    logps = -rng.uniform(5, 60, B)
    ref = logps + rng.normal(0, 3, B)
    desirable = rng.random(B) < 0.5
    desirable[0], desirable[1] = True, False  # always mixed
    kl_logps = -rng.uniform(5, 60, B)
    kl_ref = kl_logps + rng.normal(-0.5 if seed % 2 == 0 else 2.0, 1.0, B)  # odd seeds: KL mean < 0, clamped
    return (logps.astype(np.float32), np.minimum(ref, -0.5).astype(np.float32), desirable,
            kl_logps.astype(np.float32), kl_ref.astype(np.float32))


@pytest.mark.parametrize("seed", SEEDS + [3])
@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (0.1, 0.7, 1.0)])
def test_kto_loss_matches_numpy(seed, beta, wd, wu):
    logps, ref, desirable, kl_logps, kl_ref = kto_inputs(seed)
    kl = kto_kl(*j(kl_logps, kl_ref))
    want_kl = np_kto_kl(kl_logps, kl_ref)
    close(kl, want_kl)
    loss, metrics = kto_loss(*j(logps, ref, desirable), kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    want, want_metrics = np_kto(logps, ref, desirable, want_kl, beta, wd, wu)
    close(loss, want)
    check_metrics(metrics, want_metrics)
    per, _ = P.kto_losses(*j(logps, ref, desirable), kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    rho = f64(logps) - f64(ref)
    close(per, np.where(desirable, wd * (1 - np_sig(beta * (rho - want_kl))),
                        wu * (1 - np_sig(beta * (want_kl - rho)))))


def test_kto_loss_all_one_class_has_finite_metrics():
    logps, ref, _, _, _ = kto_inputs(0)
    for d in (np.ones(B, bool), np.zeros(B, bool)):
        loss, metrics = kto_loss(*j(logps, ref, d), jnp.float32(0.3), beta=0.1)
        want, want_metrics = np_kto(logps, ref, d, 0.3, 0.1, 1.0, 1.0)
        close(loss, want)
        check_metrics(metrics, want_metrics)


@pytest.mark.parametrize("seed", SEEDS + [3])
def test_kto_kl_matches_numpy(seed):
    _, _, _, kl_logps, kl_ref = kto_inputs(seed)
    close(kto_kl(*j(kl_logps, kl_ref)), np_kto_kl(kl_logps, kl_ref))
    weight = (np.arange(B) % 3 != 2).astype(np.float32)  # 0/1 row mask (padding rows get 0)
    close(kto_kl(*j(kl_logps, kl_ref, weight)), np_kto_kl(kl_logps, kl_ref, weight))
    # padding rows with garbage values do not change the weighted result
    junk = kl_logps.copy()
    junk[weight == 0] = 1e3
    close(kto_kl(*j(junk, kl_ref, weight)), np_kto_kl(kl_logps, kl_ref, weight))


def test_kto_kl_clamped_at_zero():
    kl_logps = -np.full(B, 10.0, np.float32)
    kl_ref = kl_logps + 2.0  # policy below reference: mean diff = -2
    assert float(kto_kl(*j(kl_logps, kl_ref))) == 0.0
    assert float(kto_kl(*j(kl_logps, kl_ref, np.ones(B, np.float32)))) == 0.0
    close(kto_kl(*j(kl_ref, kl_logps)), 2.0)


def test_kto_kl_and_loss_pass_no_gradient_through_kl():
    logps, ref, desirable, kl_logps, kl_ref = kto_inputs(0)
    assert float(np_kto_kl(kl_logps, kl_ref)) > 0  # not in the clamped region: stop_gradient is what is tested
    g = jax.grad(lambda a: kto_kl(a, jnp.asarray(kl_ref)))(jnp.asarray(kl_logps))
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    g = jax.grad(lambda a: kto_kl(a, jnp.asarray(kl_ref), jnp.ones(B)))(jnp.asarray(kl_logps))
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    g_kl = jax.grad(lambda k: kto_loss(*j(logps, ref, desirable), k)[0])(jnp.float32(0.7))
    assert float(g_kl) == 0.0
    g = jax.grad(lambda a: kto_loss(*j(logps, ref, desirable), kto_kl(a, jnp.asarray(kl_ref)))[0])(
        jnp.asarray(kl_logps))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 0.8, 1.3)])
def test_kto_loss_gradient_analytic(beta, wd, wu):
    logps, ref, desirable, _, _ = kto_inputs(1)
    kl = 0.4
    g = jax.grad(lambda a: kto_loss(a, *j(ref, desirable), jnp.float32(kl), beta=beta, desirable_weight=wd,
                                    undesirable_weight=wu)[0])(jnp.asarray(logps))
    rho = f64(logps) - f64(ref)
    s_d = np_sig(beta * (rho - kl))
    s_u = np_sig(beta * (kl - rho))
    want = np.where(desirable, -wd * beta * s_d * (1 - s_d), wu * beta * s_u * (1 - s_u)) / B
    close(g, want, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ jit and extreme inputs

SUM_W = np.array([-1e-3, -5.0, -5000.0, -1e4, -60.0, -0.5, -2000.0], np.float32)
SUM_L = np.array([-5000.0, -1e-3, -5.0, -60.0, -1e4, -2000.0, -0.5], np.float32)
REF_W = np.array([-3000.0, -1e4, -1e-3, -1e4, -0.5, -60.0, -1.0], np.float32)
REF_L = np.array([-1e-3, -3000.0, -1e4, -0.5, -60.0, -1.0, -2000.0], np.float32)
AVG_W = np.array([-1e-4, -30.0, -1e-4, -5.0, -20.0, -1e-3, -30.0], np.float32)
AVG_L = np.array([-30.0, -1e-4, -1e-4, -20.0, -5.0, -30.0, -1e-5], np.float32)
LENS_W = np.array([1, 3, 500, 1000, 7, 1, 200], np.int32)
LENS_L = np.array([500, 1, 2, 7, 1000, 200, 1], np.int32)


def _extreme_cases():
    cases = []
    for loss_type, eps in DPO_CASES:
        for beta in (0.1, 0.5):
            kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
            if loss_type in LENGTH_NORMALISED:
                fn = functools.partial(lambda a, b, c, d, kw: dpo_loss(a, b, c, d, chosen_lengths=jnp.asarray(LENS_W),
                                                                       rejected_lengths=jnp.asarray(LENS_L), **kw),
                                       kw=kw)
            else:
                fn = functools.partial(dpo_loss, **kw)
            cases.append((f"dpo-{loss_type}-{eps}-{beta}", fn, (SUM_W, SUM_L, REF_W, REF_L)))
    rc = np.array([1e3, -1e3, 0.0, 50.0, -50.0, 1e-3, 300.0], np.float32)
    rr = rc[::-1].copy()
    cases += [
        ("reward", reward_loss, (rc, rr)),
        ("reward-margin-center", functools.partial(lambda a, b, m: reward_loss(a, b, m, 0.01)),
         (rc, rr, np.full(B, 3.0, np.float32))),
        ("simpo", functools.partial(simpo_loss, beta=2.0, gamma=0.5), (AVG_W, AVG_L)),
        ("simpo-ls", functools.partial(simpo_loss, beta=2.0, gamma=0.5, label_smoothing=0.1), (AVG_W, AVG_L)),
        ("cpo", functools.partial(cpo_loss, beta=0.1, alpha=1.0), (SUM_W, SUM_L, -SUM_W / LENS_W)),
        ("orpo", functools.partial(orpo_loss, lam=0.1), (AVG_W, AVG_L, -AVG_W)),
        ("kto", lambda a, b, kla, klb: kto_loss(a, b, jnp.asarray(np.arange(B) % 2 == 0), kto_kl(kla, klb),
                                                beta=0.1, desirable_weight=1.0, undesirable_weight=1.33),
         (SUM_W, REF_W, SUM_L, REF_L)),
    ]
    return cases


EXTREME = _extreme_cases()


@pytest.mark.parametrize("name,fn,args", EXTREME, ids=[c[0] for c in EXTREME])
def test_losses_jit_and_finite_on_extreme_inputs(name, fn, args):
    args = j(*[np.asarray(a, np.float32) for a in args])
    eager_loss, eager_metrics = fn(*args)
    loss, metrics = jax.jit(fn)(*args)
    assert np.isfinite(float(loss)), name
    for k, v in metrics.items():
        assert np.all(np.isfinite(np.asarray(v))), (name, k)
    close(loss, float(eager_loss), rtol=1e-5, atol=1e-5)
    for k in eager_metrics:
        close(metrics[k], np.asarray(eager_metrics[k], np.float64), rtol=1e-5, atol=1e-5, err_msg=k)
    grads = jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=tuple(range(len(args)))))(*args)
    for i, g in enumerate(grads):
        assert np.all(np.isfinite(np.asarray(g))), (name, i)


# ------------------------------------------------------------------------ DPO: weighted loss-type lists

def test_dpo_weighted_list_with_sft_matches_numpy():
    """loss_type as a weighted list (TRL's loss_type list with loss_weights), "sft" the chosen completion's
    mean token NLL, plus sft_coef times that NLL (RPO)."""
    lw, ll, rw, rl, len_w, len_l = summed_inputs(6)
    kw = dict(beta=0.2, chosen_lengths=jnp.asarray(len_w), rejected_lengths=jnp.asarray(len_l))
    mix = [("sigmoid", 0.6), ("ipo", 0.3), ("sft", 0.1)]
    per_pair, metrics = P.dpo_losses(*j(lw, ll, rw, rl), loss_type=mix, sft_coef=0.05, **kw)
    nll = -f64(lw) / len_w
    want = (0.6 * np_dpo_per_pair(lw, ll, rw, rl, 0.2, "sigmoid") + 0.3 * np_dpo_per_pair(
        lw, ll, rw, rl, 0.2, "ipo", len_w=len_w, len_l=len_l) + 0.1 * nll + 0.05 * nll)
    close(per_pair, want)
    loss, mean_metrics = dpo_loss(*j(lw, ll, rw, rl), loss_type=mix, sft_coef=0.05, **kw)
    close(loss, want.mean())
    check_metrics(mean_metrics, np_dpo_metrics(lw, ll, rw, rl, 0.2))
    # a one-entry list of weight 1 is the plain loss type
    close(P.dpo_losses(*j(lw, ll, rw, rl), loss_type=[("hinge", 1.0)], **kw)[0],
          np_dpo_per_pair(lw, ll, rw, rl, 0.2, "hinge"))
    with pytest.raises(ValueError, match="chosen_lengths"):
        P.dpo_losses(*j(lw, ll, rw, rl), loss_type=[("sft", 1.0)])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*j(lw, ll, rw, rl), sft_coef=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        P.dpo_losses(*j(lw, ll, rw, rl), loss_type=[("sigmoid", 0.5), ("bogus", 0.5)])


def test_per_example_forms_return_per_example_metrics():
    """Each `*_losses` gives [B] losses and per-example metrics; the public `*_loss` is their mean."""
    lw, ll, rw, rl, len_w, _ = summed_inputs(2)
    aw, al = avg_inputs(2)
    logps, ref, desirable, _, _ = kto_inputs(2)
    nll = (-f64(lw) / len_w).astype(np.float32)
    cases = [(P.dpo_losses, dpo_loss, j(lw, ll, rw, rl)), (P.simpo_losses, simpo_loss, j(aw, al)),
             (P.cpo_losses, cpo_loss, j(lw, ll, nll)), (P.orpo_losses, orpo_loss, j(aw, al, -aw)),
             (P.kto_losses, kto_loss, j(logps, ref, desirable) + [jnp.float32(0.2)]),
             (reward_losses, reward_loss, j(lw / 10, ll / 10))]
    for per_example, public, args in cases:
        losses, metrics = per_example(*args)
        assert losses.shape == (B,), per_example.__name__
        loss, means = public(*args)
        close(loss, float(np.mean(np.asarray(losses, np.float64))), err_msg=per_example.__name__)
        assert set(means) == set(metrics), per_example.__name__
        for k, v in metrics.items():
            if isinstance(v, tuple):
                values, mask = (np.asarray(x, np.float64) for x in v)
                want = (values * mask).sum() / max(mask.sum(), 1)
            else:
                want = np.mean(np.asarray(v, np.float64))
            close(means[k], want, err_msg=f"{per_example.__name__} {k}")


# ------------------------------------------------------------------------------------- dtypes

ACCURACIES = ("accuracy", "rewards/accuracies")


def _reward_case(dtype):
    rng = np.random.default_rng(0)
    raw = (rng.normal(0.5, 2.0, B), rng.normal(-0.5, 2.0, B), rng.uniform(0, 2, B))
    (rc, rr, m), (f_rc, f_rr, f_m) = as_dtype(dtype, *(x.astype(np.float32) for x in raw))
    return reward_loss(rc, rr, m, 0.01), np_reward(f_rc, f_rr, f_m, 0.01)


def _dpo_case(loss_type, eps):
    def case(dtype):
        lw, ll, rw, rl, len_w, len_l = summed_inputs(0)
        (a, b, c, d, nw, nl), (fa, fb, fc, fd, _, _) = as_dtype(dtype, lw, ll, rw, rl, len_w, len_l)
        kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=eps)
        if loss_type in LENGTH_NORMALISED:
            kw.update(chosen_lengths=nw, rejected_lengths=nl)
        want = np_dpo_per_pair(fa, fb, fc, fd, 0.1, loss_type, eps, len_w, len_l).mean()
        return dpo_loss(a, b, c, d, **kw), (want, np_dpo_metrics(fa, fb, fc, fd, 0.1))
    return case


def _dpo_mix_case(dtype):
    lw, ll, rw, rl, len_w, len_l = summed_inputs(1)
    (a, b, c, d, nw, nl), (fa, fb, fc, fd, _, _) = as_dtype(dtype, lw, ll, rw, rl, len_w, len_l)
    got = dpo_loss(a, b, c, d, beta=0.1, loss_type=[("sigmoid", 0.7), ("hinge", 0.2), ("sft", 0.1)],
                   chosen_lengths=nw, rejected_lengths=nl, sft_coef=0.05)
    want = (0.7 * np_dpo_per_pair(fa, fb, fc, fd, 0.1, "sigmoid") + 0.2 * np_dpo_per_pair(fa, fb, fc, fd, 0.1, "hinge")
            + 0.15 * (-fa / len_w))
    return got, (want.mean(), np_dpo_metrics(fa, fb, fc, fd, 0.1))


def _simpo_case(dtype):
    (aw, al), (fw, fl) = as_dtype(dtype, *avg_inputs(0))
    return simpo_loss(aw, al, beta=2.0, gamma=0.5, label_smoothing=0.1), np_simpo(fw, fl, 2.0, 0.5, 0.1)


def _cpo_case(dtype):
    lw, ll, _, _, len_w, _ = summed_inputs(1)
    (a, b, nll), (fa, fb, fnll) = as_dtype(dtype, lw, ll, (-f64(lw) / len_w).astype(np.float32))
    return cpo_loss(a, b, nll, beta=0.1, alpha=1.0), np_cpo(fa, fb, fnll, 0.1, 1.0)


def _orpo_case(dtype):
    (aw, al), (fw, fl) = as_dtype(dtype, *avg_inputs(1))
    return orpo_loss(aw, al, -aw, lam=0.1), np_orpo(fw, fl, -fw, 0.1)


def _kto_case(dtype):
    logps, ref, desirable, kl_logps, kl_ref = kto_inputs(0)
    (a, b, d, ka, kb), (fa, fb, _, fka, fkb) = as_dtype(dtype, logps, ref, desirable, kl_logps, kl_ref)
    kl = kto_kl(ka, kb)
    assert kl.dtype == dtype and kto_kl(ka, kb, jnp.ones(B, dtype)).dtype == dtype
    return (kto_loss(a, b, d, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.33),
            np_kto(fa, fb, desirable, np_kto_kl(fka, fkb), 0.1, 1.0, 1.33))


DTYPE_CASES = ([("reward", _reward_case)] + [(f"dpo-{t}-{e}", _dpo_case(t, e)) for t, e in DPO_CASES]
               + [("dpo-mix", _dpo_mix_case), ("simpo", _simpo_case), ("cpo", _cpo_case), ("orpo", _orpo_case),
                  ("kto", _kto_case)])


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name,case", DTYPE_CASES, ids=[c[0] for c in DTYPE_CASES])
def test_losses_in_each_dtype(name, case, dtype_name):
    """Loss and every metric in the inputs' dtype, matching the float64 reference on the same (rounded)
    values. In bfloat16 a comparison near a tie may flip: accuracies may be off by one pair (1/B)."""
    with in_dtype(dtype_name) as dtype:
        (loss, metrics), (want, want_metrics) = case(dtype)
        assert_dtype(dtype, loss=loss, **{k.replace("/", "_"): v for k, v in metrics.items()})
    tol = DTYPE_TOL[dtype_name]
    close(loss, want, **tol)
    for k, v in want_metrics.items():
        atol = tol["atol"] + (1 / B if dtype_name == "bfloat16" and k in ACCURACIES else 0)
        close(metrics[k], v, rtol=tol["rtol"], atol=atol, err_msg=k)
