"""GRPO on the generic loop (jaxalign/train/grpo.py), end to end on a tiny from-scratch model with the
sampler on the live params: the reward rises and every parameter moves; the first update has ratio 1 and
KL 0; the record's extra fields reach the reward functions and the advantages; accumulation and mesh shape
leave the numbers unchanged (the token mean is global); a resumed run draws the same generations as an
uninterrupted one; num_iterations > 1 reuses generations with their old log-probs; bad configs are errors."""
import numpy as np
import pytest

from jaxalign.data import templates

from jaxalign import JaxalignError
from jaxalign.train import run as run_lib
from jaxalign.train.registry import get_task
from jaxalign.train.loop import read_metrics, train
from tests.configs_util import tiny_config
from tests.tokenizers_util import make_tokenizer, write_jsonl

GRPO = get_task("grpo")
STEPS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo-assets")
    words = ["Hello there", "Name a color.", "Yes?", "Sort the list 3 1 2", "What is two plus two?", "Thanks!",
             "The quick brown fox", "Maybe."]
    records = [{"prompt": w, "answer": "x" * (1 + i % 5)} for i, w in enumerate(words * 4)]
    return {"tokenizer": make_tokenizer(str(d / "tokenizer")), "train": write_jsonl(d / "p.jsonl", records),
            "cache": str(d / "cache")}


def make_cfg(assets, run_dir, *overrides):
    return tiny_config("grpo", run_dir, assets["tokenizer"], assets["train"], assets["cache"], *overrides,
                       optim__lr=1e-2, train__steps=STEPS, train__batch_size=4, checkpoint__async_save=False,
                       grpo__num_generations=4, grpo__max_completion_length=8,
                       grpo__reward_funcs="tests.grpo_rewards:e_fraction")


def quiet(*_):
    pass


def run(assets, run_dir, *overrides):
    result = train(make_cfg(assets, run_dir, *overrides), GRPO, log=quiet)
    return result, [m for m in read_metrics(str(run_dir)) if "loss" in m]


@pytest.fixture(scope="module")
def base(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo-base")
    result, metrics = run(assets, d, f"train.steps={3 * STEPS}")
    return {"result": result, "metrics": metrics, "run_dir": str(d)}


def test_reward_rises_and_every_parameter_moves(base, assets):
    ms = base["metrics"]
    assert len(ms) == 3 * STEPS and all(np.isfinite(m["loss"]) for m in ms)
    first, last = np.mean([m["reward"] for m in ms[:3]]), np.mean([m["reward"] for m in ms[-3:]])
    assert last > first + 0.05, [round(m["reward"], 3) for m in ms]
    cfg = make_cfg(assets, base["run_dir"])
    start = run_lib.initial_params(cfg, base["result"].model_config, base["result"].mesh,
                                tuple(map(tuple, run_lib.mesh_lib.DEFAULT_RULES)))
    import jax
    for (path, a), b in zip(jax.tree.leaves_with_path(start), jax.tree.leaves(base["result"].params)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0, jax.tree_util.keystr(path)
    for k in ("reward", "reward_std", "rewards/e_fraction", "kl", "clip_ratio", "entropy", "completions/mean_length",
              "completions/clipped_ratio", "frac_reward_zero_std", "grad_norm"):
        assert k in ms[0], k
    # mu = 1: ratio is exactly 1 at every update (old = detached current), so nothing is clipped; beta = 0: no KL
    assert all(m["clip_ratio"] == 0 and m["kl"] == 0 for m in ms)


def test_kl_to_the_reference_starts_at_zero(assets, tmp_path):
    _, ms = run(assets, tmp_path, "grpo.beta=0.1")
    assert ms[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert ms[-1]["kl"] > 1e-4


def test_extra_fields_reach_the_reward_and_the_advantages(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path, "grpo.reward_funcs=tests.grpo_rewards:e_fraction,tests.grpo_rewards:answer_length",
                   "grpo.reward_weights=1.0,0.5", "grpo.scale_rewards=none")
    host, out, metrics = first_rollout(assets, cfg)
    tok = templates.load_tokenizer(assets["tokenizer"])
    G = 4
    lengths = np.repeat([len(e["answer"]) for e in host["extra"]], G)
    assert metrics["rewards/answer_length"] == pytest.approx(lengths.mean())
    texts = [tok.decode(ids[m > 0], skip_special_tokens=True) for ids, m in zip(out["input_ids"], out["completion_mask"])]
    e = np.asarray([t.count("e") / max(len(t), 1) for t in texts])
    total = e + 0.5 * lengths
    assert metrics["reward"] == pytest.approx(total.mean(), abs=1e-6)
    assert metrics["reward_std"] == pytest.approx(total.std(), abs=1e-6)
    # Dr. GRPO advantages: reward minus its group's mean (the answer term is constant within a group)
    np.testing.assert_allclose(out["advantages"], (total.reshape(-1, G) - total.reshape(-1, G).mean(1, keepdims=True)).reshape(-1), atol=1e-5)
    assert np.abs(out["advantages"]).max() > 0


def test_unscorable_completions_get_zero_advantage(assets, tmp_path):
    _, ms = run(assets, tmp_path, "train.steps=1", "grpo.reward_funcs=tests.grpo_rewards:unscorable")
    assert ms[0]["reward"] == 0 and ms[0]["loss"] == 0


def first_rollout(assets, cfg):
    """(host batch, rollout batch, rollout metrics) of the GRPO rollout of the first 4 training prompts from the
    config's starting parameters."""
    from jaxalign.data import pipeline
    from jaxalign.train import grpo
    run = run_lib.build(cfg, GRPO, log=quiet)
    host = next(pipeline.Batches(run.train_data, 4, shuffle=False))
    return (host, *grpo.Rollout(run).rollout(host, run.initial_params(), 0))


def test_unscorable_rows_in_a_scored_group_get_zero_advantage(assets, tmp_path):
    """Odd completions cannot be scored: their advantage is exactly 0 while their scored group mates' is not
    (group centring alone would give them a nonzero one)."""
    cfg = make_cfg(assets, tmp_path, "grpo.reward_funcs=tests.grpo_rewards:half_scorable", "grpo.scale_rewards=none")
    _, out, _ = first_rollout(assets, cfg)
    adv = out["advantages"]
    assert np.all(adv[1::2] == 0) and np.abs(adv[0::2]).max() > 0


@pytest.mark.parametrize("overrides", [("train.micro_batch_size=2",), ("mesh.shape=(2,2,2)",)])
def test_accumulation_and_mesh_do_not_change_the_numbers(base, assets, tmp_path, overrides):
    _, ms = run(assets, tmp_path, f"train.steps={STEPS}", *overrides)
    for k in ("loss", "reward", "entropy"):
        np.testing.assert_allclose([m[k] for m in ms], [m[k] for m in base["metrics"][:STEPS]], atol=2e-5, err_msg=k)


@pytest.mark.parametrize("aggregation", ["seq_mean", "dr_grpo"])
def test_other_aggregations_are_invariant_to_accumulation(assets, tmp_path, aggregation):
    # micro-batches of 1 prompt x 4 generations split over 4 data-parallel devices (preflight.check_batch_divides)
    mesh = "mesh.shape=(1,4,2)"
    _, a = run(assets, tmp_path / "a", "train.steps=3", f"grpo.aggregation={aggregation}", mesh)
    _, b = run(assets, tmp_path / "b", "train.steps=3", f"grpo.aggregation={aggregation}", mesh,
               "train.micro_batch_size=1")
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], atol=2e-6)


def test_resume_draws_the_same_generations(base, assets, tmp_path):
    run(assets, tmp_path, "train.steps=3", "checkpoint.every=3")
    _, ms = run(assets, tmp_path, f"train.steps={STEPS}", "checkpoint.every=3")  # resumes at 3
    assert [m["step"] for m in ms] == list(range(1, STEPS + 1))
    for k in ("loss", "reward", "completions/mean_length"):
        np.testing.assert_allclose([m[k] for m in ms], [m[k] for m in base["metrics"][:STEPS]], atol=1e-5, err_msg=k)


def test_num_iterations_reuses_generations(assets, tmp_path):
    _, ms = run(assets, tmp_path, "train.steps=4", "grpo.num_iterations=2", "grpo.epsilon=0.01")
    # the second step of a round trains on the same generations with their old log-probs: the ratio moved
    assert ms[0]["reward"] == ms[1]["reward"] and ms[2]["reward"] == ms[3]["reward"]
    assert ms[0]["clip_ratio"] == 0 and ms[1]["clip_ratio"] > 0


@pytest.mark.parametrize("overrides,match", [
    (("grpo.reward_funcs=",), "reward_funcs is empty"),
    (("grpo.reward_funcs=tests.grpo_rewards:nope",), "no function 'nope'"),
    (("grpo.reward_funcs=no_such_module_xyz:f",), "cannot import"),
    (("grpo.estimator=ppo",), "grpo.estimator"),
    (("grpo.num_iterations=4",), "num_iterations"),
    (("grpo.reward_weights=1,2",), "reward_weights"),
])
def test_bad_config_is_an_error(assets, tmp_path, overrides, match):
    with pytest.raises(JaxalignError, match=match):
        run(assets, tmp_path, *overrides)


def test_reward_model_scores_the_rows(assets, tmp_path):
    """grpo.reward_model: a frozen RM's normalised score of each (left-padded) row joins the functions'
    rewards with its weight; checked against the RM loaded on its own."""
    import jax.numpy as jnp
    from jaxalign import loading
    from jaxalign.train.reward import rewards

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Yes?", "chosen": "Yes.", "rejected": "No."}] * 8)
    rm_cfg = make_cfg(assets, tmp_path / "rm", "task=rm", f"data.train_files={pairs}", "train.steps=2",
                      "rm.normalize_reward=true", "train.batch_size=8")  # pairs: one per device
    train(rm_cfg, get_task("rm"), log=quiet)
    cfg = make_cfg(assets, tmp_path / "g", f"grpo.reward_model={tmp_path / 'rm'}", "grpo.reward_model_weight=0.5",
                   "grpo.scale_rewards=none")
    _, out, metrics = first_rollout(assets, cfg)
    rm = loading.from_pretrained(str(tmp_path / "rm"))
    assert rm.config.reward_std != 1.0  # the stored normalisation is applied
    want = np.asarray(rewards(rm.module(), {k: jnp.asarray(out[k]) for k in ("input_ids", "attention_mask")}))
    assert metrics["rewards/reward_model"] == pytest.approx(want.mean(), abs=1e-5)
    tok = templates.load_tokenizer(assets["tokenizer"])
    texts = [tok.decode(ids[m > 0], skip_special_tokens=True) for ids, m in zip(out["input_ids"], out["completion_mask"])]
    total = np.asarray([t.count("e") / max(len(t), 1) for t in texts]) + 0.5 * want
    assert metrics["reward"] == pytest.approx(total.mean(), abs=1e-5)
    # each row's reward (functions + weighted RM score) shows in its Dr. GRPO advantage
    np.testing.assert_allclose(out["advantages"], (total.reshape(-1, 4) - total.reshape(-1, 4).mean(1, keepdims=True)).reshape(-1), atol=1e-5)
    cfg_only = make_cfg(assets, tmp_path / "g2", f"grpo.reward_model={tmp_path / 'rm'}", "grpo.reward_funcs=",
                        "train.steps=2")
    train(cfg_only, GRPO, log=quiet)  # a reward model alone is enough


def test_eval_scores_greedy_completions_of_the_held_out_prompts(assets, tmp_path):
    """eval/reward is the reward of one greedy completion per held-out prompt (checked with the sampler and
    the reward function called directly); the 3 padding rows of the last eval batch are left out."""
    from jaxalign import sampling
    from jaxalign.data import formats, templates
    from tests.grpo_rewards import e_fraction

    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": w} for w in ("Hello there", "Yes?", "Maybe.",
                                                                            "Thanks!", "Name a color.")])
    result = train(make_cfg(assets, tmp_path / "run", "train.steps=1", f"data.eval_files={held_out}",
                            "train.eval_before=true"), GRPO, log=quiet)
    before = next(m for m in read_metrics(str(tmp_path / "run")) if "eval/reward" in m)
    tok = templates.load_tokenizer(assets["tokenizer"])
    renderer = templates.Renderer(tok)
    prompts = [renderer.prompt(formats.normalize(r, "prompt")["prompt"], r.where) for r in formats.read_records(held_out)]
    start = run_lib.initial_params(make_cfg(assets, tmp_path / "run"), result.model_config, result.mesh,
                                run_lib.mesh_lib.DEFAULT_RULES)
    from jaxalign import loading
    lm = loading.LM(result.model_config, result.graphdef, start, result.mesh)
    ids, mask = sampling.left_pad(prompts, tok.pad_token_id)
    out = sampling.generate(lm, ids, mask, max_new_tokens=8, temperature=0.0, stop_token_ids=(tok.eos_token_id,))
    texts = [tok.decode(c, skip_special_tokens=True) for c in sampling.completions(out)]
    assert before["eval/reward"] == pytest.approx(np.mean(e_fraction(None, texts)), abs=1e-6)
    assert before["eval/completions/mean_length"] == pytest.approx(np.mean(np.asarray(out.lengths)), abs=1e-6)
