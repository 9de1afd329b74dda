"""Policy-gradient losses for online RL: advantages (GRPO, RLOO, REINFORCE++ baseline, GAE), the clipped
surrogate with a k1/k3 KL penalty, the clipped value loss, and the aggregations.

Conventions (as TRL's GRPO/RLOO/PPO trainers and OpenRLHF): ratio_t = exp(logp_t - old_logp_t); per-token loss
l_t = -min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps_high) A) + kl_coef * kl_t; k3 kl_t = e^(ref - logp) -
(ref - logp) - 1, k1 kl_t = logp - ref. Group std is unbiased (Bessel), as TRL and OpenRLHF.

The `*_terms` functions return per-token values, `aggregate` returns (sum, denominator) and `policy_loss_sums`
both with its metrics as (sum, count) pairs, so the training loop can sum over micro-batches and devices and
divide once: the global mean whatever the layout. policy_loss divides here.

Every output has the inputs' dtype (float32, bfloat16 or float64; masks are cast to the values' dtype).
"""
import jax
import jax.numpy as jnp

ESTIMATORS = ("grpo", "rloo", "reinforce++")
SCALES = ("group", "batch", "none")
AGGREGATIONS = ("token_mean", "seq_mean", "dr_grpo")


def _std(x, axis=None, keepdims=False):
    n = x.size if axis is None else x.shape[axis]
    return jnp.std(x, axis=axis, keepdims=keepdims) * jnp.sqrt(n / max(n - 1, 1))


def group_advantages(rewards, group_size: int, *, scale: str = "group", estimator: str = "grpo", eps: float = 1e-4):
    """Sequence advantages [N] from rewards [N] laid out group by group (prompt-major, G per prompt).

    grpo: r - mean_g, divided by the group std ("group"), the batch std ("batch") or nothing ("none",
    Dr. GRPO). rloo: r minus the mean of the other G-1 rewards of its group. reinforce++: r - mean_g, then
    whitened over the batch (REINFORCE++-baseline)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r}: expected one of {ESTIMATORS}")
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r}: expected one of {SCALES}")
    r = jnp.asarray(rewards)
    if not jnp.issubdtype(r.dtype, jnp.floating):  # integer or boolean verifier rewards
        r = r.astype(jnp.result_type(float))
    r = r.reshape(-1, group_size)
    mean = jnp.mean(r, axis=1, keepdims=True)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 samples per prompt")
        adv = (r - mean) * group_size / (group_size - 1)  # = r - (sum - r) / (G - 1)
    elif estimator == "reinforce++":
        centred = r - mean
        adv = (centred - jnp.mean(centred)) / (_std(centred) + eps)
    else:
        adv = r - mean
        if scale == "group":
            adv = adv / (_std(r, axis=1, keepdims=True) + eps)
        elif scale == "batch":
            adv = adv / (_std(r) + eps)
    return adv.reshape(-1)


def kl_penalty(logps, ref_logps, estimator: str = "k3"):
    """Per-token KL(pi || ref) estimate from the sampled token's log-probs."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        d = ref_logps - logps
        return jnp.expm1(d) - d  # expm1: no cancellation (a negative KL) when d is tiny
    raise ValueError(f"kl estimator {estimator!r}: expected k1 or k3")


def policy_loss_terms(logps, old_logps, advantages, *, clip_eps: float = 0.2, clip_eps_high=None,
                      ref_logps=None, kl_coef: float = 0.0, kl_estimator: str = "k3"):
    """Per-token (loss, clipped indicator, kl) [B, T]; advantages [B] (sequence) or [B, T] (per token)."""
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = jnp.exp(logps - old_logps)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + hi)
    surrogate = jnp.minimum(ratio * adv, clipped_ratio * adv)
    clipped = (ratio * adv != surrogate).astype(surrogate.dtype)
    loss = -surrogate
    kl = jnp.zeros_like(logps)
    if ref_logps is not None:
        kl = kl_penalty(logps, ref_logps, kl_estimator)
        loss = loss + kl_coef * kl
    return loss, clipped, kl


def aggregate(per_token, mask, aggregation: str = "token_mean", max_len=None):
    """(sum, denominator) whose ratio is the aggregated loss: token_mean = sum / tokens; seq_mean = mean
    over sequences of each one's token mean; dr_grpo = sum / (sequences x max_len)."""
    mask = mask.astype(per_token.dtype)
    total = jnp.sum(per_token * mask, axis=-1)
    rows = (jnp.sum(mask, axis=-1) > 0).astype(per_token.dtype)
    if aggregation == "token_mean":
        return jnp.sum(total), jnp.sum(mask)
    if aggregation == "seq_mean":
        return jnp.sum(total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)), jnp.sum(rows)
    if aggregation == "dr_grpo":
        return jnp.sum(total), jnp.sum(rows) * (max_len or mask.shape[-1])
    raise ValueError(f"aggregation {aggregation!r}: expected one of {AGGREGATIONS}")


def policy_loss_sums(logps, old_logps, advantages, mask, *, clip_eps: float = 0.2, clip_eps_high=None,
                     ref_logps=None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                     aggregation: str = "token_mean", max_len=None):
    """(loss sum, denominator, {"kl", "clip_ratio": (sum, token count)}) of the clipped surrogate
    (+ kl_coef * KL) over [B, T]: what the GRPO trainer adds over micro-batches and devices."""
    loss, clipped, kl = policy_loss_terms(logps, old_logps, advantages, clip_eps=clip_eps,
                                          clip_eps_high=clip_eps_high, ref_logps=ref_logps, kl_coef=kl_coef,
                                          kl_estimator=kl_estimator)
    total, denom = aggregate(loss, mask, aggregation, max_len)
    mask = mask.astype(loss.dtype)
    tokens = jnp.sum(mask)
    return total, denom, {"kl": (jnp.sum(kl * mask), tokens), "clip_ratio": (jnp.sum(clipped * mask), tokens)}


def policy_loss(logps, old_logps, advantages, mask, *, clip_eps: float = 0.2, clip_eps_high=None,
                ref_logps=None, kl_coef: float = 0.0, kl_estimator: str = "k3", aggregation: str = "token_mean",
                max_len=None):
    """The clipped surrogate (+ kl_coef * KL), aggregated over the batch given: (loss, metrics), the ratios
    of policy_loss_sums."""
    total, denom, sums = policy_loss_sums(logps, old_logps, advantages, mask, clip_eps=clip_eps,
                                          clip_eps_high=clip_eps_high, ref_logps=ref_logps, kl_coef=kl_coef,
                                          kl_estimator=kl_estimator, aggregation=aggregation, max_len=max_len)
    return total / jnp.maximum(denom, 1e-9), {k: s / jnp.maximum(n, 1) for k, (s, n) in sums.items()}


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over the masked entries, unbiased variance (TRL's masked_whiten)."""
    mask = mask.astype(x.dtype)
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / n
    var = jnp.sum(((x - mean) ** 2) * mask) / jnp.maximum(n - 1, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    return out if shift_mean else out + mean


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over [B, T] (PPO): (advantages, returns = advantages + values),
    returns computed before any whitening; positions outside `mask` get 0 and do not bootstrap."""
    dtype = jnp.result_type(rewards, values)
    mask = mask.astype(dtype)
    rewards, values = rewards.astype(dtype) * mask, values.astype(dtype) * mask

    def step(carry, xs):
        r, v, v_next, m = xs
        delta = r + gamma * v_next - v
        adv = (delta + gamma * lam * carry) * m
        return adv, adv

    v_next = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    xs = tuple(a.T for a in (rewards, values, v_next, mask))
    _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0], dtype), xs, reverse=True)
    adv = adv.T
    return adv, (adv + values) * mask


def value_loss_terms(values, old_values, returns, *, clip: float = 0.2):
    """Per-token (0.5 * max((v - R)^2, (clip(v, v_old +- clip) - R)^2), clipped indicator)."""
    v_clipped = jnp.clip(values, old_values - clip, old_values + clip)
    a, b = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * jnp.maximum(a, b)
    return loss, (b > a).astype(loss.dtype)


def value_loss(values, old_values, returns, mask, *, clip: float = 0.2):
    """The clipped value loss as a masked mean: (loss, clipfrac)."""
    loss, clipped = value_loss_terms(values, old_values, returns, clip=clip)
    mask = mask.astype(loss.dtype)
    n = jnp.maximum(jnp.sum(mask), 1)
    return jnp.sum(loss * mask) / n, jnp.sum(clipped * mask) / n
