"""The trainers' loss functions compute the public losses: each task's loss (train/preference.py,
reward.py, sft.py, grpo.py) on a small batch, its model forward replaced by given log-probs / scores, gives
(sum, denominator, {metric: (sum, count)}) whose ratios are the public jaxalign.losses function on the real
rows (weight 1; weight-0 padding rows take no part) and the float64 NumPy references of
tests/test_losses_preference.py and tests/test_losses_policy.py. Metric names are TRL's, as the trainers log
them. No model is built: these run in seconds."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxalign import losses as L
from tests.test_losses_preference import (B, np_cpo, np_dpo_metrics, np_dpo_per_pair, np_kto, np_kto_kl,
                                          np_orpo, np_reward, np_simpo, summed_inputs)

WEIGHT = np.array([1, 1, 0, 1, 1, 0, 1], np.float32)  # two padding rows (the end of an eval set)
REAL = WEIGHT > 0
assert WEIGHT.shape == (B,)


def cfg(section, **fields):
    return ml_collections.ConfigDict({section: fields})


def ratios(out):
    """(loss, {metric: value}) from a trainer's (loss sum, denominator, {metric: (sum, count)})."""
    total, denom, metrics = out
    return float(total) / float(denom), {k: float(s) / max(float(n), 1e-30) for k, (s, n) in metrics.items()}


def close(got, want, err_msg="", rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol, err_msg=err_msg)


def agree(trainer_out, public_out, reference=None):
    """The trainer's ratios equal the public function's (loss, metrics) on the real rows, and the NumPy
    reference (if given) on the same rows; the trainer logs every metric the public function returns."""
    loss, metrics = ratios(trainer_out)
    public_loss, public_metrics = public_out
    close(loss, float(public_loss), "loss", rtol=1e-6, atol=1e-7)
    assert set(metrics) >= set(public_metrics), sorted(set(public_metrics) - set(metrics))
    for k, v in public_metrics.items():
        close(metrics[k], float(v), k, rtol=1e-6, atol=1e-6)
    if reference is not None:
        want_loss, want_metrics = reference
        close(loss, want_loss, "loss vs numpy")
        for k, v in want_metrics.items():
            close(metrics[k], v, f"{k} vs numpy")
    return metrics


def pair_inputs(seed=0):
    lw, ll, rw, rl, len_w, len_l = summed_inputs(seed)
    return lw, ll, rw, rl, len_w.astype(np.float32), len_l.astype(np.float32)  # the trainer's lengths: mask sums


def sub(*xs):
    return [np.asarray(x)[REAL] for x in xs]


# ---------------------------------------------------------------------------------------- preference

@pytest.fixture
def pref(monkeypatch):
    """train.preference with pair_logps returning fixed (chosen, rejected, chosen_lengths, rejected_lengths)."""
    from jaxalign.train import preference as TP
    lw, ll, rw, rl, len_w, len_l = pair_inputs()
    monkeypatch.setattr(TP, "pair_logps", lambda model, batch, cfg: tuple(map(jnp.asarray, (lw, ll, len_w, len_l))))
    batch = {"weight": jnp.asarray(WEIGHT), "ref_chosen_logps": jnp.asarray(rw),
             "ref_rejected_logps": jnp.asarray(rl)}
    return TP, batch, (lw, ll, rw, rl, len_w, len_l)


@pytest.mark.parametrize("loss_type,sft_coef", [("sigmoid", 0.0), ("ipo", 0.0),
                                               ("sigmoid:0.7,hinge:0.2,sft:0.1", 0.05)])
def test_dpo_trainer_is_dpo_losses(pref, loss_type, sft_coef):
    TP, batch, (lw, ll, rw, rl, len_w, len_l) = pref
    c = cfg("dpo", beta=0.2, loss_type=loss_type, label_smoothing=0.0, sft_coef=sft_coef)
    out = TP.dpo_loss(None, batch, None, c, None)
    parsed = TP.parse_loss_types(loss_type)
    a, b, cc, d, nw, nl = sub(lw, ll, rw, rl, len_w, len_l)
    public = L.dpo_loss(*map(jnp.asarray, (a, b, cc, d)), beta=0.2, loss_type=parsed,
                        chosen_lengths=jnp.asarray(nw), rejected_lengths=jnp.asarray(nl), sft_coef=sft_coef)
    nll = -np.float64(a) / nw
    want = sum(w * (nll if name == "sft" else np_dpo_per_pair(a, b, cc, d, 0.2, name, 0.0, nw, nl))
               for name, w in parsed) + sft_coef * nll
    agree(out, public, (want.mean(), np_dpo_metrics(a, b, cc, d, 0.2)))


def test_dpo_trainer_reference_computed_in_the_step(pref, monkeypatch):
    """Without precomputed reference columns the reference model's log-probs come from pair_logps too."""
    TP, batch, (lw, ll, rw, rl, len_w, len_l) = pref
    monkeypatch.setattr(TP, "_ref_model", lambda model, aux: "reference")
    monkeypatch.setattr(TP, "pair_logps", lambda model, batch, cfg: tuple(map(jnp.asarray, (
        (rw, rl, len_w, len_l) if model == "reference" else (lw, ll, len_w, len_l)))))
    c = cfg("dpo", beta=0.1, loss_type="sigmoid", label_smoothing=0.1, sft_coef=0.0)
    out = TP.dpo_loss("policy", {"weight": batch["weight"]}, None, c, None)
    a, b, cc, d = sub(lw, ll, rw, rl)
    agree(out, L.dpo_loss(*map(jnp.asarray, (a, b, cc, d)), beta=0.1, label_smoothing=0.1),
          (np_dpo_per_pair(a, b, cc, d, 0.1, "sigmoid", 0.1).mean(), np_dpo_metrics(a, b, cc, d, 0.1)))


def test_simpo_trainer_is_simpo_losses(pref):
    TP, batch, (lw, ll, _, _, len_w, len_l) = pref
    out = TP.simpo_loss(None, batch, None, cfg("simpo", beta=2.0, gamma=0.5, label_smoothing=0.1), None)
    aw, al = sub(lw / np.maximum(len_w, 1), ll / np.maximum(len_l, 1))
    metrics = agree(out, L.simpo_loss(jnp.asarray(aw), jnp.asarray(al), beta=2.0, gamma=0.5, label_smoothing=0.1),
                    np_simpo(aw, al, 2.0, 0.5, 0.1))
    close(metrics["logps/chosen"], np.float64(aw).mean())


def test_cpo_trainer_is_cpo_losses(pref):
    TP, batch, (lw, ll, _, _, len_w, _) = pref
    out = TP.cpo_loss(None, batch, None, cfg("cpo", beta=0.1, alpha=0.5), None)
    a, b, nw = sub(lw, ll, len_w)
    nll = -np.float64(a) / nw
    agree(out, L.cpo_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(nll, jnp.float32), beta=0.1, alpha=0.5),
          np_cpo(a, b, nll, 0.1, 0.5))


def test_orpo_trainer_is_orpo_losses(pref):
    TP, batch, (lw, ll, _, _, len_w, len_l) = pref
    out = TP.orpo_loss(None, batch, None, cfg("orpo", lam=0.2), None)
    aw, al = sub(lw / np.maximum(len_w, 1), ll / np.maximum(len_l, 1))
    agree(out, L.orpo_loss(jnp.asarray(aw), jnp.asarray(al), -jnp.asarray(aw), lam=0.2), np_orpo(aw, al, -aw, 0.2))


def test_kto_trainer_and_pre_step_are_kto_losses(monkeypatch):
    from jaxalign.train import preference as TP
    rng = np.random.default_rng(3)
    logps, ref = -rng.uniform(5, 40, B).astype(np.float32), -rng.uniform(5, 40, B).astype(np.float32)
    kl_logps = -rng.uniform(5, 40, B).astype(np.float32)
    kl_ref = (kl_logps - rng.uniform(0.0, 2.0, B)).astype(np.float32)  # KL > 0: not clamped
    label = np.array([1, 0, 1, 1, 0, 0, 0], np.int32)
    rows = {k: jnp.zeros((B, 3), jnp.int32) for k in ("input_ids", "attention_mask", "completion_mask")}
    kl_rows = {f"kl_{k}": jnp.ones((B, 3), jnp.int32) for k in ("input_ids", "attention_mask", "completion_mask")}

    def seq_logps(model, rows, cfg):
        kl = bool(rows["input_ids"][0, 0])
        return jnp.asarray({("policy", False): logps, ("reference", False): ref, ("policy", True): kl_logps,
                            ("reference", True): kl_ref}[(model, kl)]), jnp.full(B, 3.0)

    monkeypatch.setattr(TP, "seq_logps", seq_logps)
    monkeypatch.setattr(TP, "_ref_model", lambda model, aux: "reference")
    c = cfg("kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
    batch = {**rows, **kl_rows, "weight": jnp.asarray(WEIGHT), "label": jnp.asarray(label)}
    pre = TP.kto_pre_step("policy", batch, None, c, None)
    want_kl = np_kto_kl(kl_logps, kl_ref, WEIGHT)
    assert want_kl > 0
    close(pre["kto_kl"], np.full(B, want_kl))
    out = TP.kto_loss("policy", {**batch, **pre}, None, c, None)
    a, b, d = sub(logps, ref, label.astype(bool))
    kl = L.kto_kl(*map(jnp.asarray, sub(kl_logps, kl_ref)))
    public = L.kto_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(d), kl, beta=0.1, desirable_weight=1.0,
                        undesirable_weight=1.33)
    want_loss, want_metrics = np_kto(a, b, d, want_kl, 0.1, 1.0, 1.33)
    metrics = agree(out, public, (want_loss, want_metrics))
    close(metrics["logps/chosen"], np.float64(a[d]).mean())
    close(metrics["logps/rejected"], np.float64(a[~d]).mean())


# ---------------------------------------------------------------------------------------------- RM

@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_rm_trainer_is_reward_losses(monkeypatch, center_coef):
    from jaxalign.train import reward as TR
    rng = np.random.default_rng(4)
    rc, rr = rng.normal(0.5, 2.0, B).astype(np.float32), rng.normal(-0.5, 2.0, B).astype(np.float32)
    margin = rng.uniform(0, 1, B).astype(np.float32)
    monkeypatch.setattr(TR, "stack_pairs", lambda batch: batch)
    monkeypatch.setattr(TR, "last_token_scores", lambda model, rows: jnp.asarray(np.concatenate([rc, rr])))
    batch = {"chosen_input_ids": jnp.zeros((B, 3), jnp.int32), "margin": jnp.asarray(margin),
             "weight": jnp.asarray(WEIGHT)}
    out = TR.rm_loss(None, batch, None, cfg("rm", center_coef=center_coef), None)
    a, b, m = sub(rc, rr, margin)
    metrics = agree(out, L.reward_loss(*map(jnp.asarray, (a, b, m)), center_coef or None),
                    np_reward(a, b, m, center_coef or None))
    close(metrics["rewards/chosen_sq"], (np.float64(a) ** 2).mean())  # the logged rewards/chosen_std's moment


# --------------------------------------------------------------------------------------------- SFT

def test_sft_trainer_is_sft_sums(monkeypatch):
    from jaxalign.train import sft as TS
    from tests.test_losses import np_sft, sft_inputs
    logps, mask, correct, entropy = sft_inputs()
    stats = {"correct": jnp.asarray(correct), "entropy": jnp.asarray(entropy)}
    monkeypatch.setattr(TS, "completion_logprobs", lambda model, batch, cfg: (
        jnp.asarray(logps), stats, jnp.asarray(mask, jnp.float32)))
    out = TS.sft_loss(None, {}, None, None, None)
    public_loss, public_metrics = L.sft_loss(jnp.asarray(logps), jnp.asarray(mask), stats)
    want_loss, want_metrics = np_sft(logps, mask, correct, entropy)
    loss, metrics = ratios(out)
    close(loss, float(public_loss), rtol=1e-6, atol=1e-7)
    close(loss, want_loss)
    assert float(out[1]) == float(public_metrics["tokens"]) == mask.sum()
    for k in ("token_accuracy", "entropy", "exact_match"):
        close(metrics[k], float(public_metrics[k]), k, rtol=1e-6, atol=1e-7)
        close(metrics[k], want_metrics[k], k)


# -------------------------------------------------------------------------------------------- GRPO

@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "dr_grpo"])
def test_grpo_trainer_is_policy_loss(monkeypatch, aggregation):
    from jaxalign.train import grpo as TG
    from tests.test_losses_policy import np_aggregate, np_policy_terms, policy_inputs
    logps, old, ref, adv, mask = policy_inputs(2)
    entropy = np.random.default_rng(5).uniform(0, 2, logps.shape).astype(np.float32)
    monkeypatch.setattr(TG, "completion_logprobs", lambda model, batch, cfg, temperature=1.0: (
        jnp.asarray(logps), {"entropy": jnp.asarray(entropy)}, jnp.asarray(mask)))
    c = cfg("grpo", temperature=0.7, epsilon=0.2, epsilon_high=0.28, beta=0.04, kl_estimator="k3",
            aggregation=aggregation, max_completion_length=16)
    batch = {"old_logps": jnp.asarray(old), "ref_logps": jnp.asarray(ref), "advantages": jnp.asarray(adv),
             "weight": jnp.ones(len(adv), jnp.float32)}
    out = TG.grpo_loss(None, batch, None, c, None)
    kw = dict(clip_eps=0.2, clip_eps_high=0.28, ref_logps=jnp.asarray(ref), kl_coef=0.04, aggregation=aggregation,
              max_len=16)
    public = L.policy_loss(*map(jnp.asarray, (logps, old, adv, mask)), **kw)
    w_loss, w_clipped, w_kl = np_policy_terms(logps, old, adv, 0.2, 0.28, ref, 0.04, "k3")
    n = mask.sum()
    metrics = agree(out, public, (np_aggregate(w_loss, mask, aggregation, 16),
                                  {"kl": (w_kl * mask).sum() / n, "clip_ratio": (w_clipped * mask).sum() / n}))
    close(metrics["entropy"], (np.float64(entropy) * mask).sum() / n)
