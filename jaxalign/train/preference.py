"""Offline preference tasks on the generic loop: DPO (and its loss variants), SimPO, CPO, ORPO, KTO.

Chosen and rejected rows go through one forward pass ([chosen; rejected], stacked on device). The
reference model is the starting policy (or `<task>.ref_path`); its log-probs are computed without
gradient in the step, or once over the datasets (`<task>.precompute_ref_logps`) and carried by the batches.

Per-pair losses are summed with the pairs' weights (0 for eval padding rows) and divided by the global
pair count: the same mean for any micro-batch size or mesh. NLL terms (CPO, ORPO, DPO's sft_coef) are the
mean token NLL of each chosen completion, averaged over pairs.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import JaxalignError
from jaxalign.data.pipeline import Batches, stack_pairs
from jaxalign.losses import preference as P
from jaxalign.parallel import mesh as mesh_lib
from jaxalign import lora
from jaxalign.train.loop import Task, reference_params
from jaxalign.train.sft import completion_logprobs


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


def seq_logps(model, rows, cfg):
    """Summed completion log-probs, completion token counts and per-row mean NLL of a batch of rows."""
    logp, mask = completion_logprobs(model, rows, cfg, with_stats=False)
    total = jnp.sum(logp * mask, axis=-1)
    n = jnp.sum(mask, axis=-1)
    return total, n


def pair_logps(model, batch, cfg):
    """(chosen_logps, rejected_logps, chosen_len, rejected_len) from one forward over [chosen; rejected]."""
    total, n = seq_logps(model, stack_pairs(batch), cfg)
    B = batch["chosen_input_ids"].shape[0]
    return total[:B], total[B:], n[:B], n[B:]


def _ref_model(model, aux):
    return nnx.merge(lora.reference_graphdef(model.config, aux["ref"]), aux["ref"])


def _weighted(per_pair: dict, w):
    return {k: (jnp.sum(v * w), jnp.sum(w)) for k, v in per_pair.items()}


# ------------------------------------------------------------------------------------------- DPO

def dpo_loss(model, batch, rng, cfg, aux):
    c = cfg.dpo
    cw, cl, nw, nl = pair_logps(model, batch, cfg)
    if "ref_chosen_logps" in batch:
        rw, rl = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        rw, rl, _, _ = jax.lax.stop_gradient(pair_logps(_ref_model(model, aux), batch, cfg))
    losses = jnp.zeros_like(cw)
    for name, weight in parse_loss_types(c.loss_type):
        if name == "sft":
            losses = losses + weight * (-cw / jnp.maximum(nw, 1))
        else:
            losses = losses + weight * P.dpo_losses(cw, cl, rw, rl, beta=c.beta, loss_type=name,
                                                    label_smoothing=c.label_smoothing, chosen_lengths=nw,
                                                    rejected_lengths=nl)
    if c.sft_coef:
        losses = losses + c.sft_coef * (-cw / jnp.maximum(nw, 1))
    w = batch["weight"]
    return jnp.sum(losses * w), jnp.sum(w), _weighted(P.dpo_pair_metrics(cw, cl, rw, rl, c.beta), w)


# ----------------------------------------------------------------------- reference-free: SimPO/CPO/ORPO

def simpo_loss(model, batch, rng, cfg, aux):
    c = cfg.simpo
    cw, cl, nw, nl = pair_logps(model, batch, cfg)
    aw, al = cw / jnp.maximum(nw, 1), cl / jnp.maximum(nl, 1)
    losses = P.simpo_losses(aw, al, beta=c.beta, gamma=c.gamma, label_smoothing=c.label_smoothing)
    rw, rl = c.beta * aw, c.beta * al
    w = batch["weight"]
    return jnp.sum(losses * w), jnp.sum(w), _weighted(
        {"rewards/chosen": rw, "rewards/rejected": rl, "rewards/margins": rw - rl,
         "rewards/accuracies": (rw > rl).astype(jnp.float32), "logps/chosen": aw, "logps/rejected": al}, w)


def cpo_loss(model, batch, rng, cfg, aux):
    c = cfg.cpo
    cw, cl, nw, nl = pair_logps(model, batch, cfg)
    nll = -cw / jnp.maximum(nw, 1)
    losses = P.cpo_losses(cw, cl, nll, beta=c.beta, alpha=c.alpha)
    rw, rl = c.beta * cw, c.beta * cl
    w = batch["weight"]
    return jnp.sum(losses * w), jnp.sum(w), _weighted(
        {"rewards/chosen": rw, "rewards/rejected": rl, "rewards/margins": rw - rl,
         "rewards/accuracies": (rw > rl).astype(jnp.float32), "nll_loss": nll, "logps/chosen": cw,
         "logps/rejected": cl}, w)


def orpo_loss(model, batch, rng, cfg, aux):
    c = cfg.orpo
    cw, cl, nw, nl = pair_logps(model, batch, cfg)
    aw, al = cw / jnp.maximum(nw, 1), cl / jnp.maximum(nl, 1)
    losses = P.orpo_losses(aw, al, -aw, lam=c.lam)
    log_odds = P.orpo_log_odds(aw, al)
    w = batch["weight"]
    return jnp.sum(losses * w), jnp.sum(w), _weighted(
        {"rewards/chosen": c.lam * aw, "rewards/rejected": c.lam * al, "rewards/margins": c.lam * (aw - al),
         "rewards/accuracies": (aw > al).astype(jnp.float32), "log_odds_ratio": jax.nn.log_sigmoid(log_odds),
         "log_odds_chosen": log_odds, "nll_loss": -aw, "logps/chosen": aw, "logps/rejected": al}, w)


# ------------------------------------------------------------------------------------------- KTO

def _kl_rows(batch):
    """KTO's mismatched rows: prompt i with the completion of row i+1 of the global batch."""
    return {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "completion_mask")}


def kto_pre_step(model, batch, cfg, aux):
    """The KL reference point over the whole global batch (every device and micro-batch), once per step."""
    kl_logps, _ = seq_logps(model, _kl_rows(batch), cfg)
    kl_ref, _ = seq_logps(_ref_model(model, aux), _kl_rows(batch), cfg)
    kl = P.kto_kl(kl_logps, kl_ref, batch["weight"])
    return {"kto_kl": jnp.full(batch["weight"].shape, kl)}


def kto_loss(model, batch, rng, cfg, aux):
    c = cfg.kto
    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    logps, _ = seq_logps(model, rows, cfg)
    ref, _ = jax.lax.stop_gradient(seq_logps(_ref_model(model, aux), rows, cfg))
    w = batch["weight"]
    kl = jnp.max(batch["kto_kl"])  # the same value in every row (kto_pre_step)
    desirable = batch["label"].astype(bool)
    losses = P.kto_losses(logps, ref, desirable, kl, beta=c.beta, desirable_weight=c.desirable_weight,
                          undesirable_weight=c.undesirable_weight)
    rewards = c.beta * (logps - ref)
    d = desirable.astype(jnp.float32) * w
    u = (1 - desirable.astype(jnp.float32)) * w
    metrics = {"kl": (kl * jnp.sum(w), jnp.sum(w)),
               "rewards/chosen": (jnp.sum(rewards * d), jnp.sum(d)),
               "rewards/rejected": (jnp.sum(rewards * u), jnp.sum(u)),
               "logps/chosen": (jnp.sum(logps * d), jnp.sum(d)),
               "logps/rejected": (jnp.sum(logps * u), jnp.sum(u))}
    return jnp.sum(losses * w), jnp.sum(w), metrics


# ---------------------------------------------------------------------------------- the reference

def reference_setup(section: str):
    """Task.setup for methods with a reference model: load it (frozen, sharded like the policy), and
    either hand it to every step or precompute its log-probs over the datasets once and drop it."""

    def setup(cfg, model_cfg, graphdef, mesh, rules, datasets, log, base=None):
        c = cfg[section]
        if section == "kto" and c.precompute_ref_logps:
            raise JaxalignError("kto.precompute_ref_logps is not supported: the KL rows pair each prompt with "
                                "another row's completion, so their reference log-probs depend on the batch")
        source = c.ref_path or None
        ref = reference_params(cfg, model_cfg, mesh, rules, source=source, base=base)
        if not c.precompute_ref_logps:
            return {"ref": ref}
        for data in datasets:
            precompute(lora.reference_graphdef(model_cfg, ref), ref, data, cfg, mesh, rules, log)
        return None

    return setup


def precompute(graphdef, ref, data, cfg, mesh, rules, log):
    """Reference log-probs of every pair of `data`, attached as columns ref_chosen_logps/ref_rejected_logps."""

    @jax.jit
    def run(params, batch):
        cw, cl, _, _ = pair_logps(nnx.merge(graphdef, params), batch, cfg)
        return cw, cl

    once = dataclasses.replace(data, files=[(p, 1.0) for p, _ in data.files], columns={})
    it = Batches(once, cfg.train.batch_size, shuffle=False, epochs=1, drop_last=False, buckets=cfg.data.buckets,
                 process_index=jax.process_index(), process_count=jax.process_count())
    first = np.zeros(len(data), np.float32)
    second = np.zeros(len(data), np.float32)
    for host in it:
        keys = [k for k, v in host.items() if isinstance(v, np.ndarray) and k != "weight"]
        with jax.set_mesh(mesh):
            a, b = run(ref, mesh_lib.shard_batch({k: host[k] for k in keys}, mesh, rules))
            index = mesh_lib.shard_batch({"index": host["index"]}, mesh, rules)["index"]
        a, b, index = mesh_lib.to_host(a), mesh_lib.to_host(b), mesh_lib.to_host(index)
        real = index >= 0
        first[index[real]], second[index[real]] = a[real], b[real]
    data.columns.update({"ref_chosen_logps": first, "ref_rejected_logps": second})
    log(f"precomputed reference log-probs for {len(data)} examples")


DPO = Task("dpo", dpo_loss, setup=reference_setup("dpo"))
SIMPO = Task("simpo", simpo_loss)
CPO = Task("cpo", cpo_loss)
ORPO = Task("orpo", orpo_loss)
KTO = Task("kto", kto_loss, setup=reference_setup("kto"), pre_step=kto_pre_step)
