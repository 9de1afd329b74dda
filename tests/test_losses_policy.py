"""Online-RL losses (jaxalign/losses/policy.py) against independent float64 NumPy re-implementations of the
formulas of TRL's GRPO/RLOO/PPO trainers and OpenRLHF's estimators.

The references below import nothing from jaxalign: each one is written from the formula, with explicit loops
where the papers and TRL use them (group baselines, the GAE recursion). jaxalign runs in the inputs' dtype;
the references see the same values promoted to float64. Every function is also checked in float32, bfloat16
(loose tolerance) and float64 (under jax.enable_x64, and in a process started with JAX_ENABLE_X64).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import policy as P

B, T = 6, 9
SEEDS = [0, 1, 2]
RTOL = ATOL = 1e-5
AGGREGATIONS = ["token_mean", "seq_mean", "dr_grpo"]


# ------------------------------------------------------------------------------------------- helpers

def f64(x):
    return np.asarray(x, np.float64)


def close(got, want, rtol=RTOL, atol=ATOL, err_msg=""):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol, err_msg=err_msg)


def right_padded_mask(lengths, t=T):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# Lengths with a full row, a one-token row and an empty row (a padding row of a micro-batch).
LENGTHS = [T, 4, 1, 0, 7, 5]


def policy_inputs(seed, per_token_adv=False, spread=0.3):
    """logps, old_logps (ratios spread across the clip range), ref_logps, advantages, mask."""
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 5.0, (B, T))
    old = logps + rng.normal(0.0, spread, (B, T))
    ref = logps + rng.normal(0.0, 0.5, (B, T))
    adv = rng.normal(0.0, 1.0, (B, T) if per_token_adv else (B,))
    mask = right_padded_mask(LENGTHS)
    return tuple(np.asarray(x, np.float32) for x in (logps, old, ref, adv)) + (mask,)


# ------------------------------------------------------------------------------------ NumPy references

def np_group_advantages(rewards, G, scale="group", estimator="grpo", eps=1e-4):
    """TRL GRPO (group-normalised), RLOO's leave-one-out baseline and REINFORCE++-baseline (OpenRLHF)."""
    r = f64(rewards)
    n = len(r)
    out = np.zeros(n)
    for start in range(0, n, G):
        g = r[start:start + G]
        for i in range(G):
            if estimator == "rloo":
                others = [g[j] for j in range(G) if j != i]
                out[start + i] = g[i] - sum(others) / (G - 1)
            else:  # grpo and reinforce++ both start from r - group mean
                out[start + i] = g[i] - g.mean()
                if estimator == "grpo" and scale == "group":
                    out[start + i] /= np.std(g, ddof=1) + eps
    if estimator == "grpo" and scale == "batch":
        out = out / (np.std(r, ddof=1) + eps)  # TRL: std of the raw rewards over the whole batch
    if estimator == "reinforce++":
        out = (out - out.mean()) / (np.std(out, ddof=1) + eps)
    return out


def np_kl(logps, ref, estimator):
    logps, ref = f64(logps), f64(ref)
    if estimator == "k1":
        return logps - ref
    log_r = ref - logps  # TRL: exp(ref - logp) - (ref - logp) - 1
    return np.exp(log_r) - log_r - 1.0


def np_policy_terms(logps, old, adv, eps_lo, eps_hi=None, ref=None, kl_coef=0.0, kl_est="k3"):
    """Per-token PPO/GRPO clipped surrogate, TRL's clip indicator, KL term; loops over tokens."""
    logps, old, adv = f64(logps), f64(old), f64(adv)
    eps_hi = eps_lo if eps_hi is None else eps_hi
    b, t = logps.shape
    loss, clipped, kl = np.zeros((b, t)), np.zeros((b, t)), np.zeros((b, t))
    for i in range(b):
        for k in range(t):
            a = adv[i] if adv.ndim == 1 else adv[i, k]
            c = np.exp(logps[i, k] - old[i, k])
            c_clip = min(max(c, 1 - eps_lo), 1 + eps_hi)
            loss[i, k] = -min(c * a, c_clip * a)
            # TRL: is_low_clipped = (c < 1 - eps_low) & (A < 0); is_high_clipped = (c > 1 + eps_high) & (A > 0)
            clipped[i, k] = float((c < 1 - eps_lo and a < 0) or (c > 1 + eps_hi and a > 0))
    if ref is not None:
        kl = np_kl(logps, ref, kl_est)
        loss = loss + kl_coef * kl
    return loss, clipped, kl


def np_aggregate(per_token, mask, aggregation, max_len=None):
    """TRL bnpo (token mean), grpo (mean over sequences of token means), dr_grpo (sum / (B * max_len)).
    Rows whose mask is empty are not sequences: they count in no denominator."""
    l, m = f64(per_token), f64(mask)
    rows = [i for i in range(l.shape[0]) if m[i].sum() > 0]
    if aggregation == "token_mean":
        return (l * m).sum() / m.sum()
    if aggregation == "seq_mean":
        return np.mean([(l[i] * m[i]).sum() / m[i].sum() for i in rows])
    if aggregation == "dr_grpo":
        return (l * m).sum() / (len(rows) * (max_len or l.shape[1]))
    raise AssertionError(aggregation)


def np_gae(rewards, values, mask, gamma, lam):
    """TRL's lastgaelam loop on rewards/values zeroed outside the mask (TRL zeroes values
    past the response and rewards there are 0), returns = adv + values, then masked."""
    m = f64(mask)
    r, v = f64(rewards) * m, f64(values) * m
    b, t = r.shape
    adv = np.zeros((b, t))
    lastgaelam = np.zeros(b)
    for k in reversed(range(t)):
        nextv = v[:, k + 1] if k < t - 1 else 0.0
        delta = r[:, k] + gamma * nextv - v[:, k]
        lastgaelam = delta + gamma * lam * lastgaelam
        adv[:, k] = lastgaelam
    returns = adv + v
    return adv * m, returns * m


def np_gae_closed_form(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the valid tokens of each row, V = 0 past the last one."""
    r, v = f64(rewards), f64(values)
    adv = np.zeros_like(r)
    for i, n in enumerate(lengths):
        vv = np.concatenate([v[i, :n], [0.0]])
        delta = [r[i, k] + gamma * vv[k + 1] - vv[k] for k in range(n)]
        for k in range(n):
            adv[i, k] = sum((gamma * lam) ** l * delta[k + l] for l in range(n - k))
    return adv


def np_masked_whiten(x, mask, shift_mean=True):
    """TRL masked_whiten: (x - mean) * rsqrt(var_unbiased + 1e-8), + mean back when not shift_mean."""
    x, m = f64(x), f64(mask)
    mean = (x * m).sum() / m.sum()
    var = (((x - mean) ** 2) * m).sum() / m.sum()
    var *= m.sum() / (m.sum() - 1)  # Bessel
    out = (x - mean) / np.sqrt(var + 1e-8)
    return out if shift_mean else out + mean


def np_value_loss(v, v_old, ret, mask, clip):
    v, v_old, ret, m = f64(v), f64(v_old), f64(ret), f64(mask)
    v_clip = np.clip(v, v_old - clip, v_old + clip)
    l1, l2 = (v - ret) ** 2, (v_clip - ret) ** 2
    return 0.5 * (np.maximum(l1, l2) * m).sum() / m.sum(), ((l2 > l1) * m).sum() / m.sum()


# ------------------------------------------------------------------------------------ group advantages

def rewards_for(kind, seed, n):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0.3, 1.5, n).astype(np.float32)
    # Binary verifier rewards: some groups all 0 or all 1 (zero advantage under grpo).
    return (rng.random(n) < 0.5).astype(np.float32)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["normal", "binary"])
@pytest.mark.parametrize("G", [2, 4, 8])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_numpy(seed, kind, G, scale):
    r = rewards_for(kind, seed, 4 * G)
    got = P.group_advantages(jnp.asarray(r), G, scale=scale, estimator="grpo")
    assert got.shape == (4 * G,) and got.dtype == jnp.float32
    close(got, np_group_advantages(r, G, scale, "grpo"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["normal", "binary"])
@pytest.mark.parametrize("G", [2, 3, 8])
@pytest.mark.parametrize("estimator", ["rloo", "reinforce++"])
def test_rloo_and_reinforce_pp_advantages_match_numpy(seed, kind, G, estimator):
    r = rewards_for(kind, seed, 5 * G)
    want = np_group_advantages(r, G, estimator=estimator)
    if kind == "binary" and estimator == "reinforce++" and np.std(want) == 0:
        pytest.skip("degenerate draw")
    for scale in ("group", "none"):  # scale only applies to grpo
        close(P.group_advantages(jnp.asarray(r), G, scale=scale, estimator=estimator), want, rtol=1e-4, atol=1e-5)


def test_advantage_properties():
    rng = np.random.default_rng(7)
    G = 4
    r = rng.normal(size=6 * G).astype(np.float32)
    # grpo/group: each group has mean 0 and (unbiased) std std/(std + 1e-4) ~ 1.
    a = np.asarray(P.group_advantages(jnp.asarray(r), G), np.float64).reshape(-1, G)
    close(a.mean(1), 0.0, atol=1e-6)
    close(a.std(1, ddof=1), 1.0, rtol=1e-3)
    # rloo = G / (G - 1) * (r - mean_g): scaled group-centred rewards, zero mean per group.
    a = np.asarray(P.group_advantages(jnp.asarray(r), G, estimator="rloo"), np.float64).reshape(-1, G)
    rr = f64(r).reshape(-1, G)
    close(a, (rr - rr.mean(1, keepdims=True)) * G / (G - 1))
    # reinforce++: whitened over the batch.
    a = np.asarray(P.group_advantages(jnp.asarray(r), G, estimator="reinforce++"), np.float64)
    close(a.mean(), 0.0, atol=1e-6)
    close(a.std(ddof=1), 1.0, rtol=1e-3)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_constant_groups_get_zero_advantage(scale):
    G = 4
    # Exactly representable rewards (the binary / integer verifier case): exactly 0.
    r = np.array([1.0] * G + [0.0] * G + [0.5] * G + [0.0, 1.0, 1.0, 0.0] + [2.0] * G, np.float32)
    a = np.asarray(P.group_advantages(jnp.asarray(r), G, scale=scale)).reshape(-1, G)
    assert np.all(a[[0, 1, 2, 4]] == 0.0), a
    assert np.all(a[3] != 0.0)
    # Arbitrary constant values: the float32 group mean is inexact, so the advantage is only ~0 (|A| < 1e-3).
    r = np.array([0.1] * 3 + [0.7] * 3 + [-1.3] * 3 + [0.0, 1.0, 2.0], np.float32)
    a = np.asarray(P.group_advantages(jnp.asarray(r), 3, scale=scale)).reshape(-1, 3)
    assert np.all(np.abs(a[:3]) < 1e-3), a
    assert np.all(np.isfinite(a))


def test_group_advantages_rejects_bad_arguments():
    r = jnp.arange(8, dtype=jnp.float32)
    with pytest.raises(ValueError, match="estimator"):
        P.group_advantages(r, 4, estimator="ppo")
    with pytest.raises(ValueError, match="scale"):
        P.group_advantages(r, 4, scale="global")
    with pytest.raises(ValueError, match="rloo"):
        P.group_advantages(r, 1, estimator="rloo")
    # G = 1 is fine for the others (grpo: a single sample has advantage 0, no division by zero).
    a = P.group_advantages(r, 1)
    assert np.all(np.asarray(a) == 0.0)


# ----------------------------------------------------------------------------------------------- KL

@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_matches_formula(estimator):
    logps, _, ref, _, _ = policy_inputs(0)
    close(P.kl_penalty(jnp.asarray(logps), jnp.asarray(ref), estimator), np_kl(logps, ref, estimator),
          rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k1 or k3"):
        P.kl_penalty(jnp.asarray(logps), jnp.asarray(ref), "k2")


def test_k3_nonnegative_and_zero_when_equal():
    rng = np.random.default_rng(3)
    logps = -rng.uniform(0.05, 8.0, 4000).astype(np.float32)
    # Differences of order 0.1-10 (both signs): k3 >= 0; equal log-probs: exactly 0.
    ref = (logps + rng.choice([-1, 1], 4000) * rng.uniform(0.1, 10.0, 4000)).astype(np.float32)
    k3 = np.asarray(P.kl_penalty(jnp.asarray(logps), jnp.asarray(ref), "k3"))
    assert np.all(k3 >= 0.0) and np.all(k3 > 0.0)
    assert np.all(np.asarray(P.kl_penalty(jnp.asarray(logps), jnp.asarray(logps), "k3")) == 0.0)
    assert np.all(np.asarray(P.kl_penalty(jnp.asarray(logps), jnp.asarray(logps), "k1")) == 0.0)


def test_k3_nonnegative_for_nearly_equal_logps():
    rng = np.random.default_rng(0)
    logps = -rng.uniform(0.1, 5.0, 20000).astype(np.float32)
    ref = (logps + rng.normal(0.0, 1e-3, logps.shape)).astype(np.float32)
    k3 = np.asarray(P.kl_penalty(jnp.asarray(logps), jnp.asarray(ref), "k3"))
    assert k3.min() >= 0.0, f"{(k3 < 0).sum()} negative k3 values, min {k3.min()}"


# --------------------------------------------------------------------------------- clipped surrogate

CLIP_SETTINGS = [(0.2, None), (0.2, 0.28), (0.1, 0.3)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("clip", CLIP_SETTINGS)
@pytest.mark.parametrize("kl", [None, ("k3", 0.04), ("k1", 0.1)])
def test_policy_loss_terms_match_numpy(seed, per_token_adv, clip, kl):
    logps, old, ref, adv, _ = policy_inputs(seed, per_token_adv)
    eps, eps_hi = clip
    kw = {} if kl is None else {"ref_logps": jnp.asarray(ref), "kl_estimator": kl[0], "kl_coef": kl[1]}
    loss, clipped, klv = P.policy_loss_terms(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), clip_eps=eps,
                                             clip_eps_high=eps_hi, **kw)
    w_loss, w_clipped, w_kl = np_policy_terms(logps, old, adv, eps, eps_hi, None if kl is None else ref,
                                              0.0 if kl is None else kl[1], "k3" if kl is None else kl[0])
    assert loss.shape == clipped.shape == klv.shape == (B, T)
    close(loss, w_loss)
    close(klv, w_kl)
    np.testing.assert_array_equal(np.asarray(clipped), w_clipped)
    assert 0 < w_clipped.sum() < w_clipped.size  # the inputs exercise both branches


def test_asymmetric_clip_bounds():
    """ratio 1.25 with A > 0: clipped at 1.2 (symmetric) but not at 1 + 0.28; ratio 0.75 with A < 0: clipped at
    0.8 in both (clip_eps_high only moves the upper bound)."""
    logps = jnp.log(jnp.array([[1.25, 0.75, 1.5, 0.5]], jnp.float32))
    old = jnp.zeros((1, 4), jnp.float32)
    adv = jnp.array([[1.0, -1.0, -1.0, 1.0]], jnp.float32)
    loss, clipped, _ = P.policy_loss_terms(logps, old, adv, clip_eps=0.2)
    close(loss, [[-1.2, 0.8, 1.5, -0.5]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped), [[1, 1, 0, 0]])
    loss, clipped, _ = P.policy_loss_terms(logps, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    close(loss, [[-1.25, 0.8, 1.5, -0.5]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped), [[0, 1, 0, 0]])
    # clip_eps_high=None is the symmetric clip.
    a = P.policy_loss_terms(logps, old, adv, clip_eps=0.2, clip_eps_high=None)[0]
    b = P.policy_loss_terms(logps, old, adv, clip_eps=0.2, clip_eps_high=0.2)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("clip", CLIP_SETTINGS[:2])
def test_policy_loss_matches_numpy(seed, per_token_adv, aggregation, clip):
    logps, old, ref, adv, mask = policy_inputs(seed, per_token_adv)
    eps, eps_hi = clip
    loss, metrics = P.policy_loss(*map(jnp.asarray, (logps, old, adv, mask)), clip_eps=eps, clip_eps_high=eps_hi,
                                  ref_logps=jnp.asarray(ref), kl_coef=0.05, aggregation=aggregation)
    w_loss, w_clipped, w_kl = np_policy_terms(logps, old, adv, eps, eps_hi, ref, 0.05, "k3")
    close(loss, np_aggregate(w_loss, mask, aggregation))
    close(metrics["clip_ratio"], (w_clipped * mask).sum() / mask.sum())
    close(metrics["kl"], (w_kl * mask).sum() / mask.sum())
    # The KL enters additively: loss(kl_coef) = loss(0) + kl_coef * aggregated KL.
    loss0, _ = P.policy_loss(*map(jnp.asarray, (logps, old, adv, mask)), clip_eps=eps, clip_eps_high=eps_hi,
                             ref_logps=jnp.asarray(ref), kl_coef=0.0, aggregation=aggregation)
    close(loss - loss0, 0.05 * np_aggregate(w_kl, mask, aggregation), atol=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_dr_grpo_max_len(aggregation):
    logps, old, _, adv, mask = policy_inputs(1)
    loss, _ = P.policy_loss(*map(jnp.asarray, (logps, old, adv, mask)), aggregation=aggregation, max_len=32)
    w_loss, _, _ = np_policy_terms(logps, old, adv, 0.2)
    close(loss, np_aggregate(w_loss, mask, aggregation, max_len=32))


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_policy_loss_at_ratio_one_is_minus_token_mean_advantage(per_token_adv):
    logps, _, _, adv, mask = policy_inputs(4, per_token_adv)
    loss, metrics = P.policy_loss(*map(jnp.asarray, (logps, logps, adv, mask)))
    a = np.broadcast_to(f64(adv)[:, None] if adv.ndim == 1 else f64(adv), (B, T))
    close(loss, -(a * mask).sum() / mask.sum())
    assert float(metrics["clip_ratio"]) == 0.0
    assert float(metrics["kl"]) == 0.0
    terms = P.policy_loss_terms(*map(jnp.asarray, (logps, logps, adv)))
    close(terms[0], -a)
    assert np.all(np.asarray(terms[1]) == 0.0)


def test_policy_loss_fully_masked_batch_is_zero():
    logps, old, _, adv, mask = policy_inputs(0)
    for aggregation in AGGREGATIONS:
        loss, metrics = P.policy_loss(*map(jnp.asarray, (logps, old, adv, np.zeros_like(mask))),
                                      aggregation=aggregation)
        assert float(loss) == 0.0 and np.isfinite(float(metrics["clip_ratio"]))


# --------------------------------------------------------------------------------------- aggregation

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aggregate_sum_and_denominator(seed, aggregation):
    rng = np.random.default_rng(seed)
    per_token = rng.normal(size=(B, T)).astype(np.float32)
    per_token[np.asarray(right_padded_mask(LENGTHS)) == 0] = 1e3  # garbage under the mask must not count
    mask = right_padded_mask(LENGTHS)
    s, d = P.aggregate(jnp.asarray(per_token), jnp.asarray(mask), aggregation)
    close(float(s) / float(d), np_aggregate(per_token, mask, aggregation))
    n_rows = sum(1 for n in LENGTHS if n > 0)
    want_d = {"token_mean": sum(LENGTHS), "seq_mean": n_rows, "dr_grpo": n_rows * T}[aggregation]
    close(d, want_d)
    # A boolean mask is accepted.
    s2, d2 = P.aggregate(jnp.asarray(per_token), jnp.asarray(mask > 0), aggregation)
    close(s2, float(s)), close(d2, float(d))


def test_aggregate_rejects_unknown():
    with pytest.raises(ValueError, match="aggregation"):
        P.aggregate(jnp.ones((2, 3)), jnp.ones((2, 3)), "mean")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("split", [1, 3, 4])
@pytest.mark.parametrize("max_len", [None, 16])
def test_aggregate_is_split_invariant(aggregation, split, max_len):
    """Summing (sum, denom) over micro-batches and dividing once gives the whole-batch loss (exact gradient
    accumulation). split=4 puts the empty row alone with another row in the second half."""
    logps, old, ref, adv, mask = policy_inputs(5, per_token_adv=True)
    kw = dict(clip_eps=0.2, clip_eps_high=0.28, ref_logps=jnp.asarray(ref), kl_coef=0.1)
    whole, _ = P.policy_loss(*map(jnp.asarray, (logps, old, adv, mask)), aggregation=aggregation, max_len=max_len,
                             **kw)
    tot_s = tot_d = 0.0
    for sl in (slice(0, split), slice(split, B)):
        lo, ol, ad, ma = (jnp.asarray(x[sl]) for x in (logps, old, adv, mask))
        kw["ref_logps"] = jnp.asarray(ref[sl])
        terms, _, _ = P.policy_loss_terms(lo, ol, ad, **kw)
        s, d = P.aggregate(terms, ma, aggregation, max_len)
        tot_s, tot_d = tot_s + float(s), tot_d + float(d)
    close(tot_s / tot_d, float(whole))
    w_loss, _, _ = np_policy_terms(logps, old, adv, 0.2, 0.28, ref, 0.1, "k3")
    close(tot_s / tot_d, np_aggregate(w_loss, mask, aggregation, max_len))


# ----------------------------------------------------------------------------------------------- GAE

GAE_SETTINGS = [(1.0, 0.95), (0.99, 1.0), (0.9, 0.8)]


def gae_inputs(seed, lengths):
    rng = np.random.default_rng(seed)
    b, t = len(lengths), max(max(lengths), 1)
    mask = right_padded_mask(lengths, t)
    rewards = rng.normal(0.0, 0.05, (b, t))  # per-token -kl_coef * kl ...
    for i, n in enumerate(lengths):
        if n:
            rewards[i, n - 1] += rng.normal(0.0, 2.0)  # ... plus the score on the last valid token
    values = rng.normal(0.0, 1.0, (b, t))
    # Garbage past the mask must neither show up nor bootstrap.
    rewards = np.where(mask > 0, rewards, 50.0)
    values = np.where(mask > 0, values, -30.0)
    return rewards.astype(np.float32), values.astype(np.float32), mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", GAE_SETTINGS)
def test_gae_matches_trl_loop(seed, gamma, lam):
    lengths = [12, 7, 1, 0, 10, 3]
    rewards, values, mask = gae_inputs(seed, lengths)
    adv, ret = P.gae(*map(jnp.asarray, (rewards, values, mask)), gamma=gamma, lam=lam)
    w_adv, w_ret = np_gae(rewards, values, mask, gamma, lam)
    close(adv, w_adv, rtol=1e-5, atol=1e-5)
    close(ret, w_ret, rtol=1e-5, atol=1e-5)
    close(adv, np_gae_closed_form(rewards, values, lengths, gamma, lam), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0.0)
    assert np.all(np.asarray(ret)[mask == 0] == 0.0)
    # returns = advantages + values on the valid tokens (computed before any whitening).
    close(np.asarray(ret)[mask > 0], (f64(adv) + f64(values))[mask > 0], atol=1e-5)


def test_gae_special_cases():
    rng = np.random.default_rng(11)
    rewards, values = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32)
    mask = np.ones((3, 6), np.float32)
    # lam = 0: one-step TD error.
    adv, _ = P.gae(*map(jnp.asarray, (rewards, values, mask)), gamma=0.9, lam=0.0)
    v_next = np.concatenate([f64(values)[:, 1:], np.zeros((3, 1))], 1)
    close(adv, f64(rewards) + 0.9 * v_next - f64(values))
    # gamma = lam = 1: returns are reward-to-go (Monte Carlo), independent of the values.
    _, ret = P.gae(*map(jnp.asarray, (rewards, values, mask)), gamma=1.0, lam=1.0)
    close(ret, np.cumsum(f64(rewards)[:, ::-1], 1)[:, ::-1])


# ------------------------------------------------------------------------------------------ whitening

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_trl_masked_whiten(seed, shift_mean):
    rng = np.random.default_rng(seed)
    mask = right_padded_mask(LENGTHS)
    x = rng.normal(1.5, 3.0, (B, T)).astype(np.float32)
    x[mask == 0] = 100.0  # must not enter the statistics
    got = np.asarray(P.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=shift_mean), np.float64)
    want = np_masked_whiten(x, mask, shift_mean)
    close(got, want, rtol=1e-5, atol=1e-5)
    m = mask > 0
    mean_x = f64(x)[m].mean()
    close(got[m].mean(), 0.0 if shift_mean else mean_x, atol=1e-5)
    close(got[m].var(ddof=1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------------------- value loss

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip", [0.25, 0.5])
def test_value_loss_matches_numpy(seed, clip):
    # Values on a 1/64 grid: v - v_old and v_old + (v - v_old) are exact in float32, so which branch of the max
    # wins (and the clip fraction) is not decided by rounding (see test_value_loss_clipfrac_zero_inside_clip_range for the general case).
    rng = np.random.default_rng(seed)
    mask = right_padded_mask(LENGTHS)
    grid = lambda x: np.round(x * 64) / 64  # noqa: E731
    old = grid(rng.normal(0.0, 1.0, (B, T)))
    values = old + grid(rng.normal(0.0, 0.5, (B, T)))
    returns = old + grid(rng.normal(0.0, 1.0, (B, T)))
    values, old, returns = (np.asarray(x, np.float32) for x in (values, old, returns))
    loss, clipfrac = P.value_loss(*map(jnp.asarray, (values, old, returns, mask)), clip=clip)
    w_loss, w_frac = np_value_loss(values, old, returns, mask, clip)
    close(loss, w_loss)
    close(clipfrac, w_frac)
    assert 0.0 < w_frac < 1.0
    # Inside the clip range the loss is plain 0.5 * MSE and nothing is clipped.
    inside = old + np.float32(1 / 16)
    loss, clipfrac = P.value_loss(*map(jnp.asarray, (inside, old, returns, mask)), clip=clip)
    m = mask > 0
    close(loss, 0.5 * ((f64(inside) - f64(returns))[m] ** 2).mean())
    assert float(clipfrac) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_random_values_match_numpy(seed):
    """General float32 inputs: the loss matches (the two branches differ by rounding only where they tie)."""
    rng = np.random.default_rng(seed)
    mask = right_padded_mask(LENGTHS)
    old = rng.normal(0.0, 1.0, (B, T))
    values, returns = old + rng.normal(0.0, 0.5, (B, T)), old + rng.normal(0.0, 1.0, (B, T))
    values, old, returns = (np.asarray(x, np.float32) for x in (values, old, returns))
    loss, _ = P.value_loss(*map(jnp.asarray, (values, old, returns, mask)), clip=0.2)
    close(loss, np_value_loss(values, old, returns, mask, 0.2)[0])


def test_value_loss_clipfrac_zero_inside_clip_range():
    rng = np.random.default_rng(0)
    n = 20000
    old = rng.normal(0.0, 1.0, n).astype(np.float32)
    values = (old + rng.uniform(-0.1, 0.1, n)).astype(np.float32)  # all well inside +-0.2
    returns = (old + rng.normal(0.0, 1.0, n)).astype(np.float32)
    _, clipfrac = P.value_loss(*map(jnp.asarray, (values, old, returns, np.ones(n, np.float32))), clip=0.2)
    assert float(clipfrac) == 0.0


# ------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("per_token_adv", [False, True])
def test_grad_at_ratio_one_is_reinforce(per_token_adv):
    """At logps == old_logps the clipped surrogate's gradient is the REINFORCE gradient -A / N per token."""
    logps, _, ref, adv, mask = policy_inputs(2, per_token_adv)
    a = np.broadcast_to(f64(adv)[:, None] if adv.ndim == 1 else f64(adv), (B, T))
    n = mask.sum()
    old = jnp.asarray(logps)

    def f(lp, aggregation="token_mean", **kw):
        return P.policy_loss(lp, old, jnp.asarray(adv), jnp.asarray(mask), aggregation=aggregation, **kw)[0]

    g = jax.grad(f)(jnp.asarray(logps))
    close(g, -a * mask / n, atol=1e-7)
    # seq_mean: -A / (len_i * rows); dr_grpo: -A / (rows * max_len).
    lens = mask.sum(1, keepdims=True)
    rows = (lens > 0).sum()
    g = jax.grad(f)(jnp.asarray(logps), "seq_mean")
    close(g, -a * mask / np.maximum(lens, 1) / rows, atol=1e-7)
    g = jax.grad(f)(jnp.asarray(logps), "dr_grpo")
    close(g, -a * mask / (rows * T), atol=1e-7)
    # With a k3 KL: + kl_coef * d k3 / d logp = kl_coef * (1 - exp(ref - logp)).
    g = jax.grad(f)(jnp.asarray(logps), ref_logps=jnp.asarray(ref), kl_coef=0.1)
    dk3 = 1.0 - np.exp(f64(ref) - f64(logps))
    close(g, (-a + 0.1 * dk3) * mask / n, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
def test_grad_off_policy_is_ppo_gradient(seed):
    """Away from ratio 1: d loss / d logp_t = -A ratio_t / N on unclipped tokens and 0 on clipped ones."""
    logps, old, _, adv, mask = policy_inputs(seed, per_token_adv=True)
    g = jax.grad(lambda lp: P.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                          clip_eps=0.2, clip_eps_high=0.28)[0])(jnp.asarray(logps))
    _, clipped, _ = np_policy_terms(logps, old, adv, 0.2, 0.28)
    ratio = np.exp(f64(logps) - f64(old))
    want = -f64(adv) * ratio * (1 - clipped) * mask / mask.sum()
    close(g, want, rtol=1e-5, atol=1e-7)
    assert np.any((clipped * mask) > 0)


# ------------------------------------------------------------------------------------- policy_loss_sums

@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_sums_are_policy_loss(aggregation):
    """policy_loss_sums (the GRPO trainer's form) divided once is policy_loss, and its metric sums are over
    the masked tokens."""
    logps, old, ref, adv, mask = policy_inputs(6)
    args = tuple(map(jnp.asarray, (logps, old, adv, mask)))
    kw = dict(clip_eps=0.2, clip_eps_high=0.28, ref_logps=jnp.asarray(ref), kl_coef=0.05, aggregation=aggregation)
    total, denom, sums = P.policy_loss_sums(*args, **kw)
    loss, metrics = P.policy_loss(*args, **kw)
    close(float(total) / float(denom), float(loss))
    w_loss, w_clipped, w_kl = np_policy_terms(logps, old, adv, 0.2, 0.28, ref, 0.05, "k3")
    close(float(total) / float(denom), np_aggregate(w_loss, mask, aggregation))
    assert set(sums) == set(metrics) == {"kl", "clip_ratio"}
    close(sums["kl"][0], (w_kl * mask).sum(), rtol=1e-5, atol=1e-4)
    close(sums["clip_ratio"][0], (w_clipped * mask).sum())
    close(sums["kl"][1], mask.sum())
    for k in sums:
        close(metrics[k], float(sums[k][0]) / float(sums[k][1]), err_msg=k)


# ------------------------------------------------------------------------------------------- dtypes

from tests.test_losses import DTYPE_TOL, DTYPES, as_dtype, assert_dtype, in_dtype  # noqa: E402

# bfloat16: the GAE recursion and the whitening statistics compound a few roundings more than one loss does
BF16_TOL = dict(rtol=5e-2, atol=5e-2)


def _tol(dtype_name):
    return BF16_TOL if dtype_name == "bfloat16" else DTYPE_TOL[dtype_name]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("estimator,scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                             ("rloo", "group"), ("reinforce++", "group")])
def test_group_advantages_in_each_dtype(dtype_name, estimator, scale):
    r = rewards_for("normal", 0, 16)
    with in_dtype(dtype_name) as dtype:
        (x,), (fx,) = as_dtype(dtype, r)
        got = P.group_advantages(x, 4, scale=scale, estimator=estimator)
        jitted = jax.jit(lambda a: P.group_advantages(a, 4, scale=scale, estimator=estimator))(x)
        assert_dtype(dtype, got=got, jitted=jitted)
    want = np_group_advantages(fx, 4, scale, estimator)
    close(got, want, **_tol(dtype_name))
    close(jitted, want, **_tol(dtype_name))


def test_group_advantages_of_integer_rewards_are_float():
    got = P.group_advantages(jnp.asarray([1, 0, 0, 1, 1, 1, 0, 0]), 4)
    assert jnp.issubdtype(got.dtype, jnp.floating)
    close(got, np_group_advantages(np.array([1, 0, 0, 1, 1, 1, 0, 0], np.float64), 4), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_losses_in_each_dtype(dtype_name, aggregation):
    logps, old, ref, adv, mask = policy_inputs(1, per_token_adv=True)
    with in_dtype(dtype_name) as dtype:
        (lp, ol, rf, ad), (f_lp, f_ol, f_rf, f_ad) = as_dtype(dtype, logps, old, ref, adv)
        m = jnp.asarray(mask > 0)  # a boolean mask: cast to the values' dtype inside
        kw = dict(clip_eps=0.2, clip_eps_high=0.28, ref_logps=rf, kl_coef=0.05)
        loss_t, clipped, kl = P.policy_loss_terms(lp, ol, ad, **kw)
        k1 = P.kl_penalty(lp, rf, "k1")
        s, d = P.aggregate(loss_t, m, aggregation)
        total, denom, sums = P.policy_loss_sums(lp, ol, ad, m, aggregation=aggregation, **kw)
        loss, metrics = P.policy_loss(lp, ol, ad, m, aggregation=aggregation, **kw)
        jitted, _ = jax.jit(lambda *a: P.policy_loss(*a, aggregation=aggregation, **kw))(lp, ol, ad, m)
        assert_dtype(dtype, loss_t=loss_t, clipped=clipped, kl=kl, k1=k1, s=s, d=d, total=total, denom=denom,
                     loss=loss, jitted=jitted, clip_ratio=metrics["clip_ratio"], kl_metric=metrics["kl"],
                     **{f"{k}_{i}": v for k, pair in sums.items() for i, v in enumerate(pair)})
    w_loss, w_clipped, w_kl = np_policy_terms(f_lp, f_ol, f_ad, 0.2, 0.28, f_rf, 0.05, "k3")
    tol = _tol(dtype_name)
    close(loss_t, w_loss, **tol)
    close(kl, w_kl, **tol)
    close(k1, np_kl(f_lp, f_rf, "k1"), **tol)
    close(loss, np_aggregate(w_loss, mask, aggregation), **tol)
    close(jitted, np_aggregate(w_loss, mask, aggregation), **tol)
    close(metrics["kl"], (w_kl * mask).sum() / mask.sum(), **tol)
    # a ratio within a rounding of a clip bound may land on either side in bfloat16: one or two tokens
    n_off = np.abs(np.asarray(clipped, np.float64) - w_clipped).sum()
    assert n_off <= (2 if dtype_name == "bfloat16" else 0), n_off


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_whiten_gae_and_value_loss_in_each_dtype(dtype_name):
    lengths = [9, 7, 1, 0, 9, 3]
    rewards, values, gae_mask = gae_inputs(0, lengths)
    rng = np.random.default_rng(1)
    grid = lambda x: np.round(x * 64) / 64  # noqa: E731  (no ties between the two branches, see above)
    v_old = grid(rng.normal(0.0, 1.0, (len(lengths), 9)))
    v = (v_old + grid(rng.normal(0.0, 0.5, v_old.shape))).astype(np.float32)
    ret = (v_old + grid(rng.normal(0.0, 1.0, v_old.shape))).astype(np.float32)
    v_old = v_old.astype(np.float32)
    with in_dtype(dtype_name) as dtype:
        (r, vals, m, vv, vo, rt), (fr, fvals, _, fv, fvo, frt) = as_dtype(
            dtype, rewards, values, gae_mask, v, v_old, ret)
        adv, returns = P.gae(r, vals, m, gamma=0.99, lam=0.95)
        adv_jit, _ = jax.jit(lambda a, b, c: P.gae(a, b, c, gamma=0.99, lam=0.95))(r, vals, m)
        white = P.whiten(adv, m)
        white_keep = P.whiten(adv, m, shift_mean=False)
        vl_terms, vl_clipped = P.value_loss_terms(vv, vo, rt, clip=0.25)
        vl, clipfrac = P.value_loss(vv, vo, rt, m, clip=0.25)
        assert_dtype(dtype, adv=adv, returns=returns, adv_jit=adv_jit, white=white, white_keep=white_keep,
                     vl_terms=vl_terms, vl_clipped=vl_clipped, vl=vl, clipfrac=clipfrac)
    tol = _tol(dtype_name)
    w_adv, w_ret = np_gae(fr, fvals, gae_mask, 0.99, 0.95)
    close(adv, w_adv, **tol)
    close(adv_jit, w_adv, **tol)
    close(returns, w_ret, **tol)
    # whitening the jaxalign advantages (in their dtype) against the reference whitening of the same values
    f_adv = np.asarray(adv).astype(np.float64)
    close(white, np_masked_whiten(f_adv, gae_mask), **tol)
    close(white_keep, np_masked_whiten(f_adv, gae_mask, shift_mean=False), **tol)
    w_vl, w_frac = np_value_loss(fv, fvo, frt, gae_mask, 0.25)
    close(vl, w_vl, **tol)
    close(clipfrac, w_frac, rtol=0, atol=(2 / gae_mask.sum() if dtype_name == "bfloat16" else 1e-6))


def test_float64_in_a_process_with_jax_enable_x64():
    """With JAX_ENABLE_X64 set for the whole process (NumPy float64 inputs stay float64), every loss runs,
    under jit too, and returns float64; gae's scan carry follows the inputs."""
    import os
    import subprocess
    import sys
    code = """
import jax, jax.numpy as jnp, numpy as np
from jaxalign import losses as L
assert jax.config.jax_enable_x64
f64 = jnp.float64
rng = np.random.default_rng(0)
B, T = 4, 6
lp, old, ref, vals, rews = (-rng.uniform(0.1, 3, (B, T)) for _ in range(5))
mask = (np.arange(T)[None] < np.array([6, 3, 1, 0])[:, None])
adv_seq = L.group_advantages(rng.normal(size=8), 4)
outs = {"group_advantages": adv_seq,
        "rloo": L.group_advantages(rng.normal(size=8), 4, estimator="rloo"),
        "reinforce++": L.group_advantages(rng.normal(size=8), 4, estimator="reinforce++"),
        "gae": L.gae(rews, vals, mask)[0], "gae_jit": jax.jit(L.gae)(rews, vals, mask)[1],
        "whiten": L.whiten(vals, mask),
        "policy_loss": L.policy_loss(lp, old, adv_seq[:B], mask, ref_logps=ref, kl_coef=0.1)[0],
        "policy_loss_jit": jax.jit(L.policy_loss)(lp, old, adv_seq[:B], mask)[0],
        "value_loss": L.value_loss(vals, old, rews, mask)[0],
        "sft": L.sft_loss(lp, mask)[0]}
s = lambda *a: [x.sum(-1) for x in a]
cw, cl, rw, rl = s(lp, old, ref, vals)
n = mask.sum(-1) + 1
pref = {"dpo": L.dpo_loss(cw, cl, rw, rl), "dpo_ipo": L.dpo_loss(cw, cl, rw, rl, loss_type="ipo",
                                                                  chosen_lengths=n, rejected_lengths=n),
        "dpo_jit": jax.jit(L.dpo_loss)(cw, cl, rw, rl),
        "simpo": L.simpo_loss(cw / n, cl / n), "cpo": L.cpo_loss(cw, cl, -cw / n),
        "orpo": L.orpo_loss(cw / n, cl / n, -cw / n),
        "kto": L.kto_loss(cw, rw, np.array([1, 0, 1, 0], bool), L.kto_kl(cl, rl)),
        "reward": L.reward_loss(cw, cl)}
for name, (loss, metrics) in pref.items():
    outs[name] = loss
    outs.update({f"{name}:{k}": v for k, v in metrics.items()})
bad = {k: str(v.dtype) for k, v in outs.items() if v.dtype != f64 or not np.all(np.isfinite(v))}
assert not bad, bad
print("ok", len(outs))
"""
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
