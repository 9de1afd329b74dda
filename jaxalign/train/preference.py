"""Offline preference tasks on the generic loop: DPO (and its loss variants), SimPO, CPO, ORPO, KTO.

Chosen and rejected rows go through one forward pass ([chosen; rejected], stacked on device). The
reference model is the starting policy (or `<task>.ref_path`); its log-probs are computed without
gradient in the step, or once before training (`<task>.precompute_ref_logps`: only the rows the run reads,
cached in the run directory; see train/reference.py) and carried by the batches.

Per-pair losses are summed with the pairs' weights (0 for eval padding rows) and divided by the global
pair count: the same mean for any micro-batch size or mesh. NLL terms (CPO, ORPO, DPO's sft_coef) are the
mean token NLL of each chosen completion, averaged over pairs.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import JaxalignError
from jaxalign.data.kinds import pad
from jaxalign.losses import preference as P
from jaxalign.train.reference import _ref_model, check_reference_rows, pair_logps, reference_setup, seq_logps
from jaxalign.train.task import Memory, Task, register


def parse_loss_types(spec: str) -> list:
    """'sigmoid' or a weighted list 'sigmoid:0.8,hinge:0.2' (plus 'sft' for NLL on chosen)."""
    out = []
    for item in (x.strip() for x in str(spec).split(",") if x.strip()):
        name, _, w = item.partition(":")
        if name not in P.DPO_LOSS_TYPES + ("sft",):
            raise JaxalignError(f"dpo.loss_type {name!r}: expected one of {P.DPO_LOSS_TYPES + ('sft',)}")
        out.append((name, float(w) if w else 1.0))
    if not out:
        raise JaxalignError("dpo.loss_type is empty")
    return out


# ------------------------------------------------------------------------------------------- DPO

def dpo_loss(model, batch, rng, cfg, aux):
    c = cfg.dpo
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = pair_logps(model, batch, cfg)
    if "ref_chosen_logps" in batch:
        ref_chosen_logps, ref_rejected_logps = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_chosen_logps, ref_rejected_logps, _, _ = jax.lax.stop_gradient(
            pair_logps(_ref_model(model, aux), batch, cfg))
    losses, metrics = P.dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                   beta=c.beta, loss_type=parse_loss_types(c.loss_type),
                                   label_smoothing=c.label_smoothing, chosen_lengths=chosen_lengths,
                                   rejected_lengths=rejected_lengths, sft_coef=c.sft_coef)
    w = batch["weight"]
    return jnp.sum(losses * w), jnp.sum(w), P.weighted_sums(metrics, w)


# ----------------------------------------------------------------------- reference-free: SimPO/CPO/ORPO

def simpo_loss(model, batch, rng, cfg, aux):
    c = cfg.simpo
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = pair_logps(model, batch, cfg)
    chosen_avg_logps = chosen_logps / jnp.maximum(chosen_lengths, 1)
    rejected_avg_logps = rejected_logps / jnp.maximum(rejected_lengths, 1)
    losses, metrics = P.simpo_losses(chosen_avg_logps, rejected_avg_logps, beta=c.beta, gamma=c.gamma,
                                     label_smoothing=c.label_smoothing)
    w = batch["weight"]
    return jnp.sum(losses * w), jnp.sum(w), P.weighted_sums(metrics, w)


def cpo_loss(model, batch, rng, cfg, aux):
    c = cfg.cpo
    chosen_logps, rejected_logps, chosen_lengths, _ = pair_logps(model, batch, cfg)
    chosen_nll = P.mean_token_nll(chosen_logps, chosen_lengths)
    losses, metrics = P.cpo_losses(chosen_logps, rejected_logps, chosen_nll, beta=c.beta, alpha=c.alpha)
    w = batch["weight"]
    return jnp.sum(losses * w), jnp.sum(w), P.weighted_sums(metrics, w)


def orpo_loss(model, batch, rng, cfg, aux):
    c = cfg.orpo
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = pair_logps(model, batch, cfg)
    chosen_avg_logps = chosen_logps / jnp.maximum(chosen_lengths, 1)
    rejected_avg_logps = rejected_logps / jnp.maximum(rejected_lengths, 1)
    losses, metrics = P.orpo_losses(chosen_avg_logps, rejected_avg_logps, -chosen_avg_logps, lam=c.lam)
    w = batch["weight"]
    return jnp.sum(losses * w), jnp.sum(w), P.weighted_sums(metrics, w)


# ------------------------------------------------------------------------------------------- KTO

def kto_kl_rows(host: dict, max_length: int) -> dict:
    """The host batch (of unpaired data) with KTO's mismatched rows added as kl_input_ids, kl_attention_mask
    and kl_completion_mask: prompt i with the completion of real row i+1 of the global batch (cyclically;
    eval's fill rows take no part and get empty rows), cut to max_length. From `batch_rows`, the global
    batch's token lists (dropped from the result): the KL rows of this process's rows and one padded length
    (the batch's bucket) for them and the batch's own rows, the same on every process."""
    g = host["batch_rows"]
    prompts, completions = g.prompt_ids, g.completion_ids
    real = [j for j, p in enumerate(prompts) if p is not None]
    kl = [None] * len(prompts)
    for n, j in enumerate(real):
        kl[j] = completions[real[(n + 1) % len(real)]][:max_length - len(prompts[j])]
    width = host["input_ids"].shape[1]
    T = max(width, g.bucket(max((len(prompts[j]) + len(kl[j]) for j in real), default=1)))
    out = {k: v for k, v in host.items() if k != "batch_rows"}
    for k, value in (("input_ids", g.pad_id), ("attention_mask", 0), ("completion_mask", 0)):
        if T > width:
            out[k] = np.concatenate([host[k], np.full((host[k].shape[0], T - width), value, host[k].dtype)], 1)
    rows = range(len(prompts))[g.local]
    seqs = [prompts[j] + kl[j] if prompts[j] is not None else [] for j in rows]
    cmask = [[0] * len(prompts[j]) + [1] * len(kl[j]) if prompts[j] is not None else [] for j in rows]
    out["kl_input_ids"] = pad(seqs, T, g.pad_id)
    out["kl_attention_mask"] = pad([[1] * len(s) for s in seqs], T, 0)
    out["kl_completion_mask"] = pad(cmask, T, 0)
    return out


def kto_host_batch(run, host):
    return kto_kl_rows(host, run.cfg.data.max_length)


def _kl_rows(batch):
    """KTO's mismatched rows: prompt i with the completion of row i+1 of the global batch (kto_kl_rows)."""
    return {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "completion_mask")}


def kto_pre_step(model, batch, rng, cfg, aux):
    """The KL reference point over the whole global batch (every device and micro-batch), once per step."""
    kl_logps, _ = seq_logps(model, _kl_rows(batch), cfg)
    kl_ref_logps, _ = seq_logps(_ref_model(model, aux), _kl_rows(batch), cfg)
    kl = P.kto_kl(kl_logps, kl_ref_logps, batch["weight"])
    return {"kto_kl": jnp.full(batch["weight"].shape, kl)}


def kto_loss(model, batch, rng, cfg, aux):
    c = cfg.kto
    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    logps, _ = seq_logps(model, rows, cfg)
    ref_logps, _ = jax.lax.stop_gradient(seq_logps(_ref_model(model, aux), rows, cfg))
    w = batch["weight"]
    kl = jnp.max(batch["kto_kl"])  # the same value in every row (kto_pre_step)
    desirable = batch["label"].astype(bool)
    losses, metrics = P.kto_losses(logps, ref_logps, desirable, kl, beta=c.beta,
                                   desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight)
    return jnp.sum(losses * w), jnp.sum(w), P.weighted_sums(metrics, w)


def check_dpo(cfg):
    parse_loss_types(cfg.dpo.loss_type)


def check_kto(cfg):
    if cfg.kto.precompute_ref_logps:
        raise JaxalignError("kto.precompute_ref_logps is not supported: the KL rows pair each prompt with "
                            "another row's completion, so their reference log-probs depend on the batch")


def _on_the_fly_reference(section):
    return lambda cfg: not cfg[section].precompute_ref_logps


PAIRS = Memory(sequences_per_row=lambda cfg: 2)
# Names and defaults as TRL's where it has them.
DPO = register(Task("dpo", "preference", dpo_loss, check=check_dpo, setup=reference_setup("dpo"),
                    host_batch=check_reference_rows,
                    defaults=dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_coef=0.0, ref_path="",
                                  precompute_ref_logps=False),
                    memory=Memory(sequences_per_row=lambda cfg: 2, reference=_on_the_fly_reference("dpo"))))
SIMPO = register(Task("simpo", "preference", simpo_loss, defaults=dict(beta=2.0, gamma=0.5, label_smoothing=0.0),
                      memory=PAIRS))
CPO = register(Task("cpo", "preference", cpo_loss, defaults=dict(beta=0.1, alpha=1.0), memory=PAIRS))
ORPO = register(Task("orpo", "preference", orpo_loss, defaults=dict(lam=0.1), memory=PAIRS))
KTO = register(Task("kto", "unpaired", kto_loss, check=check_kto, setup=reference_setup("kto"),
                    pre_step=kto_pre_step, host_batch=kto_host_batch,
                    defaults=dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, ref_path="",
                                  precompute_ref_logps=False),
                    memory=Memory(reference=_on_the_fly_reference("kto"))))
