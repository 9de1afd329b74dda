"""The reward-model and preference trainers end to end on a tiny from-scratch model (8 simulated CPU
devices): for rm, dpo, simpo, cpo, orpo and kto the loss is finite and falls and every parameter moves;
DPO/KTO start exactly at their policy == reference values; a precomputed reference gives the same numbers
as one computed in the step; TRL metric names; weighted DPO loss lists; micro-batch accumulation; the RM's
HF export scores like jaxalign; RM margins reach the batch and the loss.

Every run uses the same model, data shapes (one 32-token bucket), batch size and constant schedule, so a
task's compiled step is shared between its runs through the persistent compilation cache.

KTO: precomputed reference log-probs are refused (its KL rows depend on the batch), and the KL reference
point spans the whole global batch, so micro-batch accumulation gives the same losses.
"""
import json
import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import JaxalignError, loading
from jaxalign.data import pipeline, templates
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import run as run_lib
from jaxalign.train.registry import get_task
from jaxalign.train.loop import read_metrics, train
from jaxalign.train.preference import parse_loss_types
from jaxalign.train.reward import last_token_scores
from tests.configs_util import tiny_config
from tests.tokenizers_util import make_tokenizer, write_jsonl

STEPS = 10
SHORT = 5
TASKS = ("rm", "dpo", "simpo", "cpo", "orpo", "kto")
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------ fixtures

def sort_triples(n, seed):
    """Three digits from {1, 2, 3}, not all equal: ~31 tokens per chat-formatted row with the test
    tokenizer (only these digits are single tokens after a space), so max_length 32 truncates nothing."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        xs = [rng.randint(1, 3) for _ in range(3)]
        if len(set(xs)) > 1:
            out.append(xs)
    return out


def text(xs):
    return " ".join(map(str, xs))


def preference_records(n, seed, margins=False):
    out = []
    for i, xs in enumerate(sort_triples(n, seed)):
        r = {"prompt": "sort: " + text(xs), "chosen": text(sorted(xs)), "rejected": text(sorted(xs, reverse=True))}
        if margins:
            r["margin"] = None if i % 8 == 7 else round(0.25 * (1 + i % 7), 2)  # a few records without one
        out.append(r)
    return out


def unpaired_records(n, seed):
    out = []
    for i, xs in enumerate(sort_triples(n, seed)):
        good = i % 2 == 0
        out.append({"prompt": "sort: " + text(xs), "completion": text(sorted(xs, reverse=not good)),
                    "label": good})
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref-assets")
    return {
        "tokenizer": make_tokenizer(str(d / "tokenizer")),
        "pref": write_jsonl(d / "pref.jsonl", preference_records(32, 0)),
        "margin": write_jsonl(d / "margin.jsonl", preference_records(32, 0, margins=True)),
        "kto": write_jsonl(d / "kto.jsonl", unpaired_records(32, 1)),
        "cache": str(d / "data-cache"),
    }


def make_cfg(assets, run_dir, task, *overrides):
    return tiny_config(task, run_dir, assets["tokenizer"], assets["kto"] if task == "kto" else assets["pref"],
                       assets["cache"], *overrides, optim__lr=3e-3, train__steps=STEPS, train__batch_size=8,
                       train__micro_batch_size=8, checkpoint__async_save=False)


def quiet(*_):
    pass


def step_metrics(run_dir):
    return [m for m in read_metrics(run_dir) if "loss" in m]


def losses(run_dir):
    return [m["loss"] for m in step_metrics(run_dir)]


def leaves(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(params)}


def run(assets, run_dir, task, *overrides, log=quiet):
    cfg = make_cfg(assets, run_dir, task, *overrides)
    result = train(cfg, get_task(task), log=log)
    return {"cfg": cfg, "result": result, "run_dir": str(run_dir), "losses": losses(run_dir),
            "metrics": step_metrics(run_dir)}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """runs(task) -> the task's reference run (10 steps, batch 8 in one micro-batch), made once; the RM run
    exports to HF."""
    done = {}

    def get(task):
        if task not in done:
            extra = ("checkpoint.export_hf=true",) if task == "rm" else ()
            done[task] = run(assets, tmp_path_factory.mktemp(f"run-{task}"), task, *extra)
        return done[task]
    return get


@pytest.fixture(scope="module")
def precomputed(assets, tmp_path_factory):
    """DPO with the reference precomputed, SHORT steps: 40 rows of 32, so every row (a full precompute)."""
    return run(assets, tmp_path_factory.mktemp("run-dpo-pre"), "dpo", f"train.steps={SHORT}",
               "dpo.precompute_ref_logps=true")


def initial_params(r):
    """The parameters the run started from (what the loop initialises for this config and mesh)."""
    result = r["result"]
    return run_lib.initial_params(r["cfg"], result.model_config, result.mesh,
                               mesh_lib.normalize_rules(r["cfg"].mesh.rules))


# ------------------------------------------------------------------ 1. every task trains, every param moves

@pytest.mark.parametrize("task", TASKS)
def test_loss_falls_and_every_parameter_changes(runs, task):
    r = runs(task)
    result, ls = r["result"], r["losses"]
    assert result.step == STEPS
    assert [m["step"] for m in r["metrics"]] == list(range(1, STEPS + 1))
    assert len(ls) == STEPS and all(np.isfinite(ls)), ls
    assert np.mean(ls[-3:]) < np.mean(ls[:3]), ls
    assert all(m["nonfinite"] == 0.0 for m in r["metrics"])

    init, final = leaves(initial_params(r)), leaves(result.params)
    assert init.keys() == final.keys() and len(init) >= 10
    if task == "rm":
        assert result.model_config.num_labels == 1 and not result.model_config.lm_head
        assert any(k.startswith("['score']") for k in final) and not any("lm_head" in k for k in final)
    else:
        assert not any(k.startswith("['score']") for k in final)
    for name in init:
        assert init[name].shape == final[name].shape, name
        assert np.all(np.isfinite(final[name])), name
        assert not np.array_equal(init[name], final[name]), f"{task}: {name} did not change"
        if name.startswith("['layers']"):  # stacked layers: each layer's slice moved
            for i in range(init[name].shape[0]):
                assert not np.array_equal(init[name][i], final[name][i]), f"{task}: {name}[{i}] did not change"


def test_dpo_starts_at_ln2(runs):
    m = runs("dpo")["metrics"][0]
    assert m["loss"] == pytest.approx(LN2, abs=1e-5)
    # policy == reference: every implicit reward is 0 at the first step
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert m[k] == pytest.approx(0.0, abs=1e-5), k
    assert m["rewards/accuracies"] == 0.0


def test_kto_starts_at_half_the_weight(runs):
    r = runs("kto")
    m = r["metrics"][0]
    assert r["cfg"].kto.desirable_weight == r["cfg"].kto.undesirable_weight == 1.0
    assert m["loss"] == pytest.approx(0.5 * 1.0, abs=1e-5)  # 1 - sigmoid(0), KL = 0
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------- 2. reference and metrics

def test_dpo_precomputed_reference_matches_on_the_fly(runs, precomputed):
    on_the_fly = runs("dpo")
    pre = precomputed
    np.testing.assert_allclose(pre["losses"], on_the_fly["losses"][:SHORT], atol=1e-5, rtol=0)
    assert pre["losses"][0] == pytest.approx(LN2, abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose([m[k] for m in pre["metrics"]],
                                   [m[k] for m in on_the_fly["metrics"][:SHORT]], atol=1e-4, rtol=1e-5, err_msg=k)


def test_kto_refuses_precomputed_reference(assets, tmp_path):
    """KTO's KL rows (prompt i + the next row's completion) depend on how batches are formed, so their
    reference log-probs cannot be precomputed per example: the option is an error, not a silent drift."""
    with pytest.raises(JaxalignError, match="precompute_ref_logps"):
        run(assets, tmp_path, "kto", "train.steps=1", "kto.precompute_ref_logps=true")


TRL_METRICS = {
    "rm": ("accuracy", "margin", "rewards/chosen", "rewards/rejected"),
    "dpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"),
    "simpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"),
    "cpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll_loss"),
    "orpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll_loss",
             "log_odds_ratio", "log_odds_chosen"),
    "kto": ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"),
}


@pytest.mark.parametrize("task", TASKS)
def test_metrics_logged_with_trl_names(runs, task):
    ms = runs(task)["metrics"]
    for m in ms:
        for k in ("loss", "grad_norm", "lr") + TRL_METRICS[task]:
            assert k in m and np.isfinite(m[k]), (task, k)
    last = ms[-1]
    for k in ("accuracy", "rewards/accuracies"):
        if k in last:
            assert 0.0 <= last[k] <= 1.0
    if task == "rm":
        assert last["margin"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], abs=1e-4)
    if task in ("dpo", "simpo", "cpo", "orpo"):
        assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], abs=1e-4)
    if task == "dpo":  # rewards = beta * (logps - ref logps); they have moved off zero
        assert abs(last["rewards/margins"]) > 1e-3
    if task == "kto":
        assert all(m["kl"] >= 0.0 for m in ms)


# ------------------------------------------------------------------------------ 3. DPO loss_type lists

def test_parse_loss_types():
    assert parse_loss_types("sigmoid") == [("sigmoid", 1.0)]
    assert parse_loss_types("sigmoid:0.5, hinge:0.5") == [("sigmoid", 0.5), ("hinge", 0.5)]
    for bad in ("bogus", "sigmoid:0.5,bogus:0.5", " , "):
        with pytest.raises(JaxalignError):
            parse_loss_types(bad)


def test_dpo_weighted_loss_list_trains(assets, tmp_path):
    r = run(assets, tmp_path, "dpo", f"train.steps={SHORT}", "dpo.loss_type=sigmoid:0.5,hinge:0.5")
    ls = r["losses"]
    assert len(ls) == SHORT and all(np.isfinite(ls)), ls
    # At the start policy == reference: 0.5 * -log sigmoid(0) + 0.5 * relu(1 - 0).
    assert ls[0] == pytest.approx(0.5 * LN2 + 0.5, abs=1e-5)
    assert ls[-1] < ls[0], ls


def test_dpo_unknown_loss_type_is_an_error(assets, tmp_path):
    with pytest.raises(JaxalignError, match="bogus"):
        train(make_cfg(assets, tmp_path, "dpo", "train.steps=1", "dpo.loss_type=bogus"), get_task("dpo"),
              log=quiet)


# ---------------------------------------------------------------------------------- 4. accumulation

@pytest.mark.parametrize("micro", [4, 2])
def test_dpo_accumulation_matches_one_big_batch(runs, assets, tmp_path, micro):
    base = runs("dpo")
    # a micro-batch must split over the data-parallel devices (preflight.check_batch_divides): fsdp = micro
    r = run(assets, tmp_path, "dpo", f"train.steps={SHORT}", f"train.micro_batch_size={micro}",
            f"mesh.shape=(1,{micro},{8 // micro})")
    np.testing.assert_allclose(r["losses"], base["losses"][:SHORT], atol=1e-5, rtol=0)
    for k in ("rewards/margins", "logps/chosen"):
        np.testing.assert_allclose([m[k] for m in r["metrics"]], [m[k] for m in base["metrics"][:SHORT]],
                                   atol=1e-4, rtol=1e-5, err_msg=k)


def test_kto_accumulation_matches_one_big_batch(runs, assets, tmp_path):
    """DESIGN §3: results do not change with micro-batch size. KTO's KL reference point is a mean over the
    batch (TRL: gathered over every rank), so it too must span the whole global batch."""
    base = runs("kto")
    r = run(assets, tmp_path, "kto", f"train.steps={SHORT}", "train.micro_batch_size=4", "mesh.shape=(1,4,2)")
    assert r["losses"][0] == pytest.approx(0.5, abs=1e-5)  # KL = 0 at the start: no difference yet
    np.testing.assert_allclose(r["losses"], base["losses"][:SHORT], atol=1e-5, rtol=0)
    np.testing.assert_allclose([m["kl"] for m in r["metrics"]], [m["kl"] for m in base["metrics"][:SHORT]],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("task,shape", [("dpo", (2, 2, 2)), ("kto", (8, 1, 1)), ("kto", (2, 2, 2)),
                                        ("rm", (1, 4, 2))])
def test_mesh_shape_does_not_change_the_numbers(runs, assets, tmp_path, task, shape):
    """The reference runs use the default mesh (1, 8, 1); data parallel, FSDP x TP and all three axes give
    the same losses and metrics (KTO's KL point spans the global batch whatever the layout)."""
    base = runs(task)
    r = run(assets, tmp_path, task, f"train.steps={SHORT}", f"mesh.shape={shape}")
    assert dict(zip(r["result"].mesh.axis_names, r["result"].mesh.axis_sizes)) == dict(
        zip(("data", "fsdp", "model"), shape))
    np.testing.assert_allclose(r["losses"], base["losses"][:SHORT], atol=1e-5, rtol=0)
    key = {"dpo": "rewards/margins", "kto": "kl", "rm": "margin"}[task]
    np.testing.assert_allclose([m[key] for m in r["metrics"]], [m[key] for m in base["metrics"][:SHORT]],
                               atol=1e-4, rtol=1e-5, err_msg=key)


# -------------------------------------------------------------------------------------- 5. RM export

def test_rm_export_hf_scores_match(runs, assets):
    import torch
    import transformers

    r = runs("rm")
    run_dir = r["run_dir"]
    hf_dir = os.path.join(run_dir, "hf")
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"] and hf_cfg.get("num_labels", 1) == 1
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf_dir, output_loading_info=True, dtype=torch.float32)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (k, info)
    assert model.config.num_labels == 1

    tok = templates.load_tokenizer(assets["tokenizer"])
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    texts = ["sort: 3 1 2 1 2 3", "sort: 2 1 1 2 1 1", "Hello there, how are you today?", "Yes."]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert len({len(s) for s in seqs}) > 1  # ragged: right padding matters
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), tok.pad_token_id, np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1

    with torch.no_grad():
        hf_scores = model.eval()(input_ids=torch.as_tensor(ids, dtype=torch.long),
                                 attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits[:, 0].numpy()
    lm = loading.from_pretrained(run_dir)  # the run directory: its last checkpoint
    ours = np.asarray(last_token_scores(lm.module(), {"input_ids": jnp.asarray(ids),
                                                      "attention_mask": jnp.asarray(mask)}))
    assert ours.shape == (len(seqs),)
    np.testing.assert_allclose(hf_scores, ours, atol=1e-4, rtol=0)
    assert np.ptp(ours) > 1e-3  # the scores are not all the same number


# ------------------------------------------------------------------------------------- 6. RM margins

def test_rm_margins_reach_the_batch_and_the_loss(runs, assets, tmp_path):
    cfg = make_cfg(assets, tmp_path, "rm", f"train.steps={SHORT}", "data.train_files=" + assets["margin"])
    data = pipeline.prepare_from_config(cfg, "train", log=quiet, kind="preference")
    with open(assets["margin"]) as f:
        want = [json.loads(line)["margin"] for line in f]
    assert len(data) == len(want) == 32
    batch = next(pipeline.Batches(data, 8, shuffle=False))
    assert batch["margin"].dtype == np.float32
    np.testing.assert_allclose(batch["margin"], [m if m is not None else 0.0 for m in want[:8]], atol=0)
    assert batch["margin"].max() > 0

    r = run(assets, tmp_path, "rm", f"train.steps={SHORT}", "data.train_files=" + assets["margin"])
    ls = r["losses"]
    assert len(ls) == SHORT and all(np.isfinite(ls)) and ls[-1] < ls[0], ls
    # Same records, seed and start as the plain RM run, so the same first batch: positive margins can only
    # raise -log sigmoid(r_c - r_r - margin).
    assert ls[0] > runs("rm")["losses"][0] + 1e-3, (ls[0], runs("rm")["losses"][0])


# ------------------------------------------------------------------------ 7. RM reward normalisation

def test_rm_reward_normalisation_stored_and_applied(assets, tmp_path):
    from jaxalign.convert.hf import config_from_hf
    from jaxalign.data.pipeline import stack_pairs
    from jaxalign.train.reward import rewards

    r = run(assets, tmp_path, "rm", f"train.steps={SHORT}", "rm.normalize_reward=true", "checkpoint.export_hf=true")
    last = r["metrics"][-1]
    assert "rewards/chosen_std" in last and "rewards/rejected_std" in last and last["rewards/chosen_std"] >= 0
    assert not any(k.endswith("_sq") for k in last)

    lm = loading.from_pretrained(r["run_dir"])
    assert lm.config.reward_std != 1.0 and lm.config.reward_mean != 0.0
    hf = config_from_hf(os.path.join(r["run_dir"], "hf"))
    assert (hf.reward_mean, hf.reward_std) == (lm.config.reward_mean, lm.config.reward_std)

    # Independently: the raw scores of every chosen and rejected row of the set (no eval set: the train set)
    data = pipeline.prepare_from_config(r["cfg"], "train", log=quiet, kind="preference")
    batch = next(pipeline.Batches(data, len(data), shuffle=False, epochs=1))
    rows = {k: jnp.asarray(v) for k, v in stack_pairs(batch).items()}
    raw = np.asarray(last_token_scores(lm.module(), rows))
    assert raw.shape == (2 * len(data),)
    np.testing.assert_allclose(lm.config.reward_mean, raw.mean(), atol=1e-4)
    np.testing.assert_allclose(lm.config.reward_std, raw.std(), rtol=1e-3)
    normed = np.asarray(rewards(lm.module(), rows))
    np.testing.assert_allclose(normed, (raw - raw.mean()) / raw.std(), atol=1e-3)


# ------------------------------------------------- 8. the precomputed reference: what the run reads, cached

def cached_ref(run_dir, name="train"):
    with np.load(os.path.join(run_dir, "ref_logps", f"{name}.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def ref_calls(monkeypatch):
    """The example indices handed to each reference forward pass (reference.reference_logps)."""
    from jaxalign.train import reference
    calls, real = [], reference.reference_logps

    def counting(graphdef, ref, data, rows, *a, **k):
        calls.append(np.asarray(rows).copy())
        return real(graphdef, ref, data, rows, *a, **k)
    monkeypatch.setattr(reference, "reference_logps", counting)
    return calls


def test_precompute_visits_match_the_iterator(assets, tmp_path):
    """Batches.visits(n) is the set of examples the next n batches read: shuffled epochs and their rollover,
    a weighted mix, a restored position, an eval pass (with its filled last batch)."""
    cfg = make_cfg(assets, tmp_path, "dpo", f"data.train_files={assets['pref']}:0.5,{assets['margin']}:2")
    data = pipeline.prepare_from_config(cfg, "train", log=quiet, kind="preference")

    def read(it, n):
        return np.unique(np.concatenate([next(it)["index"] for _ in range(n)]))

    for n in (1, 3, 10, 17):
        it = pipeline.Batches(data, 8, seed=3)
        np.testing.assert_array_equal(it.visits(n), read(pipeline.Batches(data, 8, seed=3), n))
        assert it.state() == {"epoch": 0, "position": 0}
    it = pipeline.Batches(data, 8, seed=3)
    it.restore({"epoch": 1, "position": 9})
    want = pipeline.Batches(data, 8, seed=3)
    want.restore(it.state())
    np.testing.assert_array_equal(it.visits(4), read(want, 4))
    plain = pipeline.prepare_from_config(make_cfg(assets, tmp_path, "dpo"), "train", log=quiet, kind="preference")
    for d in (data, plain):
        once = lambda: pipeline.Batches(d, 6, shuffle=False, epochs=1, drop_last=False)
        every = np.concatenate([b["index"] for b in once()])
        assert (every == -1).any()  # the filled last batch
        np.testing.assert_array_equal(once().visits(10 ** 6), np.unique(every[every >= 0]))
        np.testing.assert_array_equal(once().visits(2), read(once(), 2))
    np.testing.assert_array_equal(pipeline.Batches(plain, 6, shuffle=False, epochs=1).visits(2), np.arange(12))


def test_dpo_precompute_computes_only_visited_rows_and_trains_like_a_full_one(assets, tmp_path, precomputed,
                                                                              ref_calls):
    """2 steps of 8 read 16 of the 32 pairs: only those get a reference forward, the others stay NaN and no
    step reads one; the losses and the computed values are bit-identical to a full precompute's. Eval with
    train.eval_batches=1 reads the eval set's first batch: only those 8 rows."""
    part = run(assets, tmp_path, "dpo", "train.steps=2", "dpo.precompute_ref_logps=true",
               f"data.eval_files={assets['margin']}", "train.eval_batches=1", "train.eval_every=2")
    data = pipeline.prepare_from_config(part["cfg"], "train", log=quiet, kind="preference")
    visited = pipeline.Batches(data, 8, seed=part["cfg"].seed).visits(2)
    assert len(ref_calls) == 2 and len(visited) == 16
    np.testing.assert_array_equal(ref_calls[0], visited)
    np.testing.assert_array_equal(ref_calls[1], np.arange(8))
    assert np.flatnonzero(cached_ref(part["run_dir"], "eval")["computed"]).tolist() == list(range(8))
    ev = part["result"].eval_metrics
    assert ev and all(np.isfinite(v) for v in ev.values()), ev
    c, full = cached_ref(part["run_dir"]), cached_ref(precomputed["run_dir"])
    assert full["computed"].all() and np.isfinite(full["chosen"]).all()
    np.testing.assert_array_equal(np.flatnonzero(c["computed"]), visited)
    assert np.isnan(c["chosen"][~c["computed"]]).all() and np.isnan(c["rejected"][~c["computed"]]).all()
    for k in ("chosen", "rejected"):
        np.testing.assert_array_equal(c[k][visited], full[k][visited], err_msg=k)
    assert all(m["nonfinite"] == 0.0 for m in part["metrics"])
    np.testing.assert_array_equal(part["losses"], precomputed["losses"][:2])
    for k in ("rewards/margins", "logps/chosen"):
        assert [m[k] for m in part["metrics"]] == [m[k] for m in precomputed["metrics"][:2]], k


def test_dpo_batch_never_reads_a_reference_not_precomputed():
    from jaxalign.train.reference import check_reference_rows
    nan = np.float32("nan")
    host = {"weight": np.asarray([1, 1, 0], np.float32), "index": np.asarray([4, 7, -1]),
            "ref_chosen_logps": np.asarray([-3, -2, 0], np.float32),
            "ref_rejected_logps": np.asarray([-1, -2, 0], np.float32)}
    assert check_reference_rows(None, host) is host
    assert check_reference_rows(None, {**host, "ref_chosen_logps": np.asarray([-3, -2, nan])}) is not None
    with pytest.raises(JaxalignError, match=r"examples \[7\]"):
        check_reference_rows(None, {**host, "ref_rejected_logps": np.asarray([-1, nan, 0], np.float32)})


def test_dpo_resumed_run_loads_the_precomputed_reference(assets, tmp_path, ref_calls, capsys):
    """Resumed from step 1, the run loads run_dir/ref_logps and makes no reference forward; run longer, it
    computes only the rows the extra step adds (with a progress bar counting pairs)."""
    import shutil

    pre = ("dpo.precompute_ref_logps=true", "checkpoint.every=1")
    first = run(assets, tmp_path, "dpo", "train.steps=2", *pre)
    assert len(ref_calls) == 1 and len(ref_calls[0]) == 16
    before = cached_ref(first["run_dir"])
    shutil.rmtree(tmp_path / "checkpoints" / "2")  # as if stopped after step 1
    lines = []
    again = run(assets, tmp_path, "dpo", "train.steps=2", *pre, log=lines.append)
    assert lines[0] == "resuming from step 1"
    assert any("reference log-probs (train): 16 of 32 examples loaded from" in l for l in lines), lines
    assert len(ref_calls) == 1  # no reference forward
    np.testing.assert_allclose(again["losses"], first["losses"], atol=1e-6, rtol=0)

    lines.clear()
    capsys.readouterr()
    longer = run(assets, tmp_path, "dpo", "train.steps=3", *pre, "train.progress=true", log=lines.append)
    err = capsys.readouterr().err
    assert "reference log-probs (train): 100%" in err and "8/8" in err and "pair" in err, err
    assert len(ref_calls) == 2 and len(ref_calls[1]) == 8 and not set(ref_calls[1]) & set(ref_calls[0])
    assert any("precomputed reference log-probs for 8 of 32 examples" in l for l in lines), lines
    after = cached_ref(longer["run_dir"])
    assert after["computed"].sum() == 24 and after["key"] == before["key"]
    np.testing.assert_array_equal(after["chosen"][ref_calls[0]], before["chosen"][ref_calls[0]])
    assert len(longer["losses"]) == 3 and all(m["nonfinite"] == 0.0 for m in longer["metrics"])


def test_dpo_precompute_cache_not_reused_for_other_data(assets, tmp_path, ref_calls):
    """The same run directory with changed records: the cache's key no longer matches, so it is recomputed."""
    run(assets, tmp_path, "dpo", "train.steps=1", "dpo.precompute_ref_logps=true")
    a = cached_ref(tmp_path)
    other = write_jsonl(tmp_path / "other.jsonl", preference_records(32, 7))
    lines = []
    run(assets, tmp_path, "dpo", "train.steps=1", "dpo.precompute_ref_logps=true", f"data.train_files={other}",
        log=lines.append)
    assert lines[0] == "resuming from step 1"
    assert len(ref_calls) == 2, lines
    assert any("made for other data or another reference" in l for l in lines), lines
    b = cached_ref(tmp_path)
    assert a["key"] != b["key"] and b["computed"].sum() == 8 and np.isfinite(b["chosen"][b["computed"]]).all()
    assert not np.array_equal(a["chosen"][a["computed"]], b["chosen"][b["computed"]])


def test_dpo_precompute_reference_identity(assets, tmp_path):
    """The cache key changes with the reference: its files (size, mtime), the seed of a from-scratch one, the
    data's cache key."""
    import types
    from jaxalign.models.presets import get_preset
    from jaxalign.train.reference import data_key, reference_identity

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 10)
    fake = lambda *o: types.SimpleNamespace(cfg=make_cfg(assets, tmp_path, "dpo", *o), lora_spec=None,
                                            model_cfg=get_preset("tiny"), mesh=None, rules=())
    scratch = reference_identity(fake())
    assert reference_identity(fake()) == scratch != reference_identity(fake("seed=1"))
    assert reference_identity(fake(), ref_path=str(model)) == reference_identity(fake(f"model.path={model}"))
    loaded = reference_identity(fake(f"model.path={model}"))
    (model / "model.safetensors").write_bytes(b"y" * 11)
    assert reference_identity(fake(f"model.path={model}")) != loaded

    class D:
        def __init__(self, key):
            self.cache_path = "/cache/" + key

        def __len__(self):
            return 32
    assert data_key(D("abc"), scratch) == data_key(D("abc"), scratch) != data_key(D("abd"), scratch)
