"""Preference losses: the DPO family, SimPO, CPO, ORPO, KTO (DESIGN.md §4; formulas as in TRL, see
../shared/REFERENCE.md §2.2-2.6).

Inputs are sequence log-probs: summed over completion tokens (`*_logps`) or averaged (`*_avg_logps`).
Each public function returns (mean loss over the batch, metrics). The `*_losses` forms return per-pair
values so the trainer can sum them over micro-batches and devices.
"""
import jax
import jax.numpy as jnp

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "apo_zero", "apo_down", "sigmoid_norm")


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
               loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """Per-pair DPO-family losses [B] (reverse-KL score: rho = logp - ref_logp)."""
    rho_w = chosen_logps - ref_chosen_logps
    rho_l = rejected_logps - ref_rejected_logps
    delta = rho_w - rho_l
    eps = label_smoothing
    z = beta * delta
    if loss_type == "sigmoid":  # cDPO when label_smoothing > 0
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    if loss_type == "robust":
        return (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return jax.nn.relu(1 - z)
    if loss_type in ("ipo", "sigmoid_norm"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} is length-normalised: pass chosen/rejected_lengths")
        norm = rho_w / jnp.maximum(chosen_lengths, 1) - rho_l / jnp.maximum(rejected_lengths, 1)
        if loss_type == "ipo":
            return (norm - 1 / (2 * beta)) ** 2
        return -log_sigmoid(beta * norm)
    if loss_type == "exo_pair":
        eps = eps or 1e-3
        return (sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps))
                + sigmoid(-z) * (log_sigmoid(-z) - jnp.log(eps)))
    if loss_type == "nca_pair":
        return (-log_sigmoid(beta * rho_w) - 0.5 * log_sigmoid(-beta * rho_w)
                - 0.5 * log_sigmoid(-beta * rho_l))
    if loss_type == "bco_pair":
        return -log_sigmoid(beta * rho_w) - log_sigmoid(-beta * rho_l)
    if loss_type == "sppo_hard":
        return (rho_w - 1 / (2 * beta)) ** 2 + (rho_l + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - sigmoid(beta * rho_w)) + sigmoid(beta * rho_l)
    if loss_type == "apo_down":
        return sigmoid(beta * rho_w) + (1 - sigmoid(z))
    raise ValueError(f"unknown DPO loss_type {loss_type!r}: expected one of {DPO_LOSS_TYPES}")


def dpo_pair_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Per-pair values of TRL's DPO metrics (averaged by the caller)."""
    rw = beta * (chosen_logps - ref_chosen_logps)
    rl = beta * (rejected_logps - ref_rejected_logps)
    return {"rewards/chosen": rw, "rewards/rejected": rl, "rewards/margins": rw - rl,
            "rewards/accuracies": (rw > rl).astype(jnp.float32), "logps/chosen": chosen_logps,
            "logps/rejected": rejected_logps}


def _mean_metrics(per_pair: dict) -> dict:
    return {k: jnp.mean(v) for k, v in per_pair.items()}


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    losses = dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                        loss_type=loss_type, label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                        rejected_lengths=rejected_lengths)
    metrics = dpo_pair_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return jnp.mean(losses), _mean_metrics(metrics)


def simpo_losses(chosen_avg_logps, rejected_avg_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)


def simpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    losses = simpo_losses(chosen_avg_logps, rejected_avg_logps, beta=beta, gamma=gamma,
                          label_smoothing=label_smoothing)
    rw, rl = beta * chosen_avg_logps, beta * rejected_avg_logps
    return jnp.mean(losses), _mean_metrics({"rewards/chosen": rw, "rewards/rejected": rl,
                                            "rewards/margins": rw - rl,
                                            "rewards/accuracies": (rw > rl).astype(jnp.float32)})


def cpo_losses(chosen_logps, rejected_logps, chosen_nll, *, beta=0.1, alpha=1.0):
    """CPO on summed log-probs, no reference: -log sigmoid(beta (l_w - l_l)) + alpha * NLL(chosen)."""
    return -log_sigmoid(beta * (chosen_logps - rejected_logps)) + alpha * chosen_nll


def cpo_loss(chosen_logps, rejected_logps, chosen_nll, *, beta=0.1, alpha=1.0):
    losses = cpo_losses(chosen_logps, rejected_logps, chosen_nll, beta=beta, alpha=alpha)
    rw, rl = beta * chosen_logps, beta * rejected_logps
    return jnp.mean(losses), _mean_metrics({"rewards/chosen": rw, "rewards/rejected": rl,
                                            "rewards/margins": rw - rl,
                                            "rewards/accuracies": (rw > rl).astype(jnp.float32),
                                            "nll_loss": chosen_nll})


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    ln2 = jnp.log(2.0)
    # Each branch gets an argument clipped to its own side, so the unused branch's gradient stays finite.
    return jnp.where(x < -ln2, jnp.log1p(-jnp.exp(jnp.minimum(x, -ln2))), jnp.log(-jnp.expm1(jnp.maximum(x, -ln2))))


def orpo_log_odds(chosen_avg_logps, rejected_avg_logps):
    return (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))


def orpo_losses(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, lam=0.1):
    """NLL(chosen completion) - lam * log sigmoid(log odds ratio), per pair."""
    return chosen_nll - lam * log_sigmoid(orpo_log_odds(chosen_avg_logps, rejected_avg_logps))


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, lam=0.1):
    losses = orpo_losses(chosen_avg_logps, rejected_avg_logps, chosen_nll, lam=lam)
    log_odds = orpo_log_odds(chosen_avg_logps, rejected_avg_logps)
    rw, rl = lam * chosen_avg_logps, lam * rejected_avg_logps
    return jnp.mean(losses), _mean_metrics({"rewards/chosen": rw, "rewards/rejected": rl,
                                            "rewards/margins": rw - rl,
                                            "rewards/accuracies": (rw > rl).astype(jnp.float32),
                                            "log_odds_ratio": log_sigmoid(log_odds), "log_odds_chosen": log_odds,
                                            "nll_loss": chosen_nll})


def kto_losses(logps, ref_logps, desirable, kl, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example KTO losses: desirable 1 - sigmoid(beta (rho - KL)), undesirable 1 - sigmoid(beta (KL - rho)),
    weighted; `kl` is the (detached, clamped) reference point."""
    rho = logps - ref_logps
    kl = jax.lax.stop_gradient(kl)
    return jnp.where(desirable, desirable_weight * (1 - sigmoid(beta * (rho - kl))),
                     undesirable_weight * (1 - sigmoid(beta * (kl - rho))))


def kto_kl(kl_logps, kl_ref_logps, weight=None):
    """The KL reference point: mean over the batch of (policy - reference) log-probs of mismatched pairs,
    clamped at 0 and without gradient."""
    diff = kl_logps - kl_ref_logps
    mean = jnp.mean(diff) if weight is None else jnp.sum(diff * weight) / jnp.maximum(jnp.sum(weight), 1)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(logps, ref_logps, desirable, kl, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    losses = kto_losses(logps, ref_logps, desirable, kl, beta=beta, desirable_weight=desirable_weight,
                        undesirable_weight=undesirable_weight)
    rewards = beta * (logps - ref_logps)
    d = desirable.astype(jnp.float32)
    metrics = {"kl": kl, "rewards/chosen": jnp.sum(rewards * d) / jnp.maximum(jnp.sum(d), 1),
               "rewards/rejected": jnp.sum(rewards * (1 - d)) / jnp.maximum(jnp.sum(1 - d), 1)}
    return jnp.mean(losses), metrics
