"""Preference losses: the DPO family, SimPO, CPO, ORPO, KTO, with the formulas and logged metrics of TRL's
DPOTrainer, CPOTrainer (SimPO is its loss_type="simpo"), ORPOTrainer and KTOTrainer.

Inputs are sequence log-probs: summed over completion tokens (`*_logps`) or averaged (`*_avg_logps`).
Each loss has a per-example form, `*_losses`, returning (per-example losses [B], per-example metrics; see
jaxalign.losses.reduce for the kinds of metric): the trainers sum it with the examples' weights over
micro-batches and devices. The public `*_loss` is its mean over the batch: (loss, metrics).

Every output has the dtype of the inputs (float32, bfloat16 or float64 alike).
"""
import jax
import jax.numpy as jnp

from jaxalign.losses import reduce
from jaxalign.losses.reduce import mean_loss

weighted_sums = reduce.weighted_sums  # how the trainers sum the *_losses' metrics (with the rows' weights)

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "apo_zero", "apo_down", "sigmoid_norm")


def _accuracy(chosen, rejected):
    """1 where chosen > rejected (strictly: ties count as wrong), in the values' dtype."""
    return (chosen > rejected).astype(jnp.result_type(chosen, rejected))


def mean_token_nll(logps, lengths):
    """Mean token NLL of each completion from its summed log-prob and token count."""
    return -logps / jnp.maximum(lengths, 1)


# ---------------------------------------------------------------------------------------------- DPO

def dpo_type_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
                    loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """Per-pair losses [B] of one DPO_LOSS_TYPES entry (reverse-KL score: rho = logp - ref_logp)."""
    rho_chosen = chosen_logps - ref_chosen_logps
    rho_rejected = rejected_logps - ref_rejected_logps
    delta = rho_chosen - rho_rejected
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
        norm = rho_chosen / jnp.maximum(chosen_lengths, 1) - rho_rejected / jnp.maximum(rejected_lengths, 1)
        if loss_type == "ipo":
            return (norm - 1 / (2 * beta)) ** 2
        return -log_sigmoid(beta * norm)
    if loss_type == "exo_pair":
        eps = eps or 1e-3
        return (sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps))
                + sigmoid(-z) * (log_sigmoid(-z) - jnp.log(eps)))
    if loss_type == "nca_pair":
        return (-log_sigmoid(beta * rho_chosen) - 0.5 * log_sigmoid(-beta * rho_chosen)
                - 0.5 * log_sigmoid(-beta * rho_rejected))
    if loss_type == "bco_pair":
        return -log_sigmoid(beta * rho_chosen) - log_sigmoid(-beta * rho_rejected)
    if loss_type == "sppo_hard":
        return (rho_chosen - 1 / (2 * beta)) ** 2 + (rho_rejected + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - sigmoid(beta * rho_chosen)) + sigmoid(beta * rho_rejected)
    if loss_type == "apo_down":
        return sigmoid(beta * rho_chosen) + (1 - sigmoid(z))
    raise ValueError(f"unknown DPO loss_type {loss_type!r}: expected one of {DPO_LOSS_TYPES}")


def dpo_pair_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Per-pair values of TRL's DPO metrics."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": _accuracy(chosen_rewards, rejected_rewards), "logps/chosen": chosen_logps,
            "logps/rejected": rejected_logps}


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
               loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
               sft_coef=0.0):
    """Per-pair (losses [B], metrics) of the DPO family.

    loss_type is one of DPO_LOSS_TYPES, or a weighted list [(name, weight), ...] of them and "sft" (the
    chosen completion's mean token NLL, which needs chosen_lengths) whose losses are summed, as TRL's
    loss_type list with loss_weights. sft_coef > 0 adds sft_coef times that NLL (RPO)."""
    kw = dict(beta=beta, label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
              rejected_lengths=rejected_lengths)
    needs_nll = sft_coef or (not isinstance(loss_type, str) and any(name == "sft" for name, _ in loss_type))
    if needs_nll and chosen_lengths is None:
        raise ValueError("the sft term is the chosen completion's mean token NLL: pass chosen_lengths")
    if isinstance(loss_type, str):
        losses = dpo_type_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                 loss_type=loss_type, **kw)
    else:
        losses = jnp.zeros_like(chosen_logps)
        for name, weight in loss_type:
            if name == "sft":
                losses = losses + weight * mean_token_nll(chosen_logps, chosen_lengths)
            else:
                losses = losses + weight * dpo_type_losses(chosen_logps, rejected_logps, ref_chosen_logps,
                                                           ref_rejected_logps, loss_type=name, **kw)
    if sft_coef:
        losses = losses + sft_coef * mean_token_nll(chosen_logps, chosen_lengths)
    return losses, dpo_pair_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None, sft_coef=0.0):
    """The mean of dpo_losses over the batch: (loss, metrics)."""
    return mean_loss(dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                                loss_type=loss_type, label_smoothing=label_smoothing,
                                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                                sft_coef=sft_coef))


# ------------------------------------------------------------------------------------------- SimPO

def simpo_losses(chosen_avg_logps, rejected_avg_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """Per-pair (losses, metrics): -log sigmoid(beta (a_w - a_l) - gamma), cDPO-smoothed; rewards beta * a."""
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = -(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)
    chosen_rewards, rejected_rewards = beta * chosen_avg_logps, beta * rejected_avg_logps
    return losses, {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                    "rewards/margins": chosen_rewards - rejected_rewards,
                    "rewards/accuracies": _accuracy(chosen_rewards, rejected_rewards),
                    "logps/chosen": chosen_avg_logps, "logps/rejected": rejected_avg_logps}


def simpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    return mean_loss(simpo_losses(chosen_avg_logps, rejected_avg_logps, beta=beta, gamma=gamma,
                                  label_smoothing=label_smoothing))


# --------------------------------------------------------------------------------------------- CPO

def cpo_losses(chosen_logps, rejected_logps, chosen_nll, *, beta=0.1, alpha=1.0):
    """Per-pair (losses, metrics) of CPO on summed log-probs, no reference:
    -log sigmoid(beta (l_w - l_l)) + alpha * NLL(chosen)."""
    losses = -log_sigmoid(beta * (chosen_logps - rejected_logps)) + alpha * chosen_nll
    chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
    return losses, {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                    "rewards/margins": chosen_rewards - rejected_rewards,
                    "rewards/accuracies": _accuracy(chosen_rewards, rejected_rewards), "nll_loss": chosen_nll,
                    "logps/chosen": chosen_logps, "logps/rejected": rejected_logps}


def cpo_loss(chosen_logps, rejected_logps, chosen_nll, *, beta=0.1, alpha=1.0):
    return mean_loss(cpo_losses(chosen_logps, rejected_logps, chosen_nll, beta=beta, alpha=alpha))


# -------------------------------------------------------------------------------------------- ORPO

def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    ln2 = jnp.log(2.0)  # weakly typed: takes x's dtype
    # Each branch gets an argument clipped to its own side, so the unused branch's gradient stays finite.
    return jnp.where(x < -ln2, jnp.log1p(-jnp.exp(jnp.minimum(x, -ln2))), jnp.log(-jnp.expm1(jnp.maximum(x, -ln2))))


def orpo_log_odds(chosen_avg_logps, rejected_avg_logps):
    """log odds(chosen) - log odds(rejected), odds(y) = p / (1 - p) with p = exp(average log-prob)."""
    return (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))


def orpo_losses(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, lam=0.1):
    """Per-pair (losses, metrics): NLL(chosen completion) - lam * log sigmoid(log odds ratio)."""
    log_odds = orpo_log_odds(chosen_avg_logps, rejected_avg_logps)
    log_odds_ratio = log_sigmoid(log_odds)
    losses = chosen_nll - lam * log_odds_ratio
    return losses, {"rewards/chosen": lam * chosen_avg_logps, "rewards/rejected": lam * rejected_avg_logps,
                    "rewards/margins": lam * (chosen_avg_logps - rejected_avg_logps),
                    "rewards/accuracies": _accuracy(chosen_avg_logps, rejected_avg_logps),
                    "log_odds_ratio": log_odds_ratio, "log_odds_chosen": log_odds, "nll_loss": chosen_nll,
                    "logps/chosen": chosen_avg_logps, "logps/rejected": rejected_avg_logps}


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, lam=0.1):
    return mean_loss(orpo_losses(chosen_avg_logps, rejected_avg_logps, chosen_nll, lam=lam))


# --------------------------------------------------------------------------------------------- KTO

def kto_losses(logps, ref_logps, desirable, kl, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example (losses, metrics) of KTO: desirable 1 - sigmoid(beta (rho - KL)), undesirable
    1 - sigmoid(beta (KL - rho)), weighted; `kl` is the (detached, clamped) reference point (kto_kl).
    The rewards beta * rho and log-probs are averaged per class (desirable: "chosen")."""
    desirable = jnp.asarray(desirable).astype(bool)
    rho = logps - ref_logps
    kl = jax.lax.stop_gradient(kl)
    losses = jnp.where(desirable, desirable_weight * (1 - sigmoid(beta * (rho - kl))),
                       undesirable_weight * (1 - sigmoid(beta * (kl - rho))))
    rewards = beta * rho
    chosen = desirable.astype(rewards.dtype)
    rejected = 1 - desirable.astype(rewards.dtype)
    return losses, {"kl": kl, "rewards/chosen": (rewards, chosen), "rewards/rejected": (rewards, rejected),
                    "logps/chosen": (logps, chosen), "logps/rejected": (logps, rejected)}


def kto_kl(kl_logps, kl_ref_logps, weight=None):
    """The KL reference point: mean over the batch of (policy - reference) log-probs of mismatched pairs,
    clamped at 0 and without gradient."""
    diff = kl_logps - kl_ref_logps
    mean = jnp.mean(diff) if weight is None else jnp.sum(diff * weight) / jnp.maximum(jnp.sum(weight), 1)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(logps, ref_logps, desirable, kl, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    return mean_loss(kto_losses(logps, ref_logps, desirable, kl, beta=beta, desirable_weight=desirable_weight,
                                undesirable_weight=undesirable_weight))
