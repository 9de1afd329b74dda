"""PPO with a critic (jaxalign/train/ppo.py) end to end on tiny from-scratch models: a reward model is
trained first (a few steps) and serves as the frozen reward model and the critic's start. One episode
moves every actor and critic parameter; the first update has ratio 1 and zero KL to the reference; the
score lands on the last real completion token; a jaxalign RM run and its HF export score alike; a resumed
run continues the same episodes; a PPO run directory loads as its policy."""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import JaxalignError, loading
from jaxalign.train import run as run_lib
from jaxalign.train.registry import get_task
from jaxalign.train.loop import read_metrics, train
from jaxalign.train.ppo import shape_rewards
from jaxalign.train.reward import last_index
from tests.configs_util import tiny_config
from tests.tokenizers_util import make_tokenizer, write_jsonl

STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo-assets")
    words = ["Hello there", "Name a color.", "Yes?", "Sort the list 3 1 2", "What is two plus two?", "Thanks!",
             "The quick brown fox", "Maybe."]
    prompts = [{"prompt": w} for w in words * 4]
    pairs = [{"prompt": w, "chosen": "Yes.", "rejected": "No."} for w in words * 2]
    sft = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": "Thanks!"}]} for w in words]
    out = {"tokenizer": make_tokenizer(str(d / "tokenizer")), "prompts": write_jsonl(d / "p.jsonl", prompts),
           "pairs": write_jsonl(d / "pairs.jsonl", pairs), "sft": write_jsonl(d / "sft.jsonl", sft),
           "cache": str(d / "cache")}
    rm = base(out, d / "rm", "rm")
    rm.data.train_files = out["pairs"]
    rm.train.steps = 3
    rm.checkpoint.export_hf = True
    train(rm, get_task("rm"), log=quiet)
    out["rm"] = str(d / "rm")
    return out


def quiet(*_):
    pass


def base(assets, run_dir, task, train_files="", *overrides, **fields):
    # batch 4: a mesh with 4 data-parallel devices (preflight.check_batch_divides refuses a batch it would replicate)
    return tiny_config(task, run_dir, assets["tokenizer"], train_files, assets["cache"], *overrides, optim__lr=1e-2,
                       train__batch_size=4, mesh__shape=(1, 4, 2), checkpoint__async_save=False, **fields)


def make_cfg(assets, run_dir, *overrides):
    return base(assets, run_dir, "ppo", assets["prompts"], *overrides, train__steps=STEPS,
                ppo__reward_model=assets["rm"], ppo__max_completion_length=8)


def run(assets, run_dir, *overrides):
    result = train(make_cfg(assets, run_dir, *overrides), get_task("ppo"), log=quiet)
    return result, [m for m in read_metrics(str(run_dir)) if "loss" in m]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo-run")
    result, ms = run(assets, d, "ppo.num_collect_steps=2", "ppo.ppo_epochs=2")
    return {"result": result, "metrics": ms, "run_dir": str(d)}


def test_shape_rewards_puts_the_score_on_the_last_real_completion_token():
    # two rows: a left-padded prompt (action tokens 3..5) and one whose completion hits max length (2..6)
    action = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]], np.float32)
    kl = np.arange(14, dtype=np.float32).reshape(2, 7) / 10
    score = np.array([2.0, -1.0], np.float32)
    r = np.asarray(shape_rewards(jnp.asarray(kl), jnp.asarray(score), action, 0.1))
    want = -0.1 * kl * action
    want[0, 5] += 2.0
    want[1, 6] += -1.0
    np.testing.assert_allclose(r, want, atol=1e-6)
    assert list(np.asarray(last_index(action))) == [5, 6]
    empty = np.asarray(shape_rewards(jnp.zeros((1, 3)), jnp.asarray([5.0]), np.zeros((1, 3)), 0.1))
    assert not empty.any()  # no action token: the score has nowhere to land


def test_one_episode_moves_actor_and_critic(reference, assets):
    result, ms = reference["result"], reference["metrics"]
    assert len(ms) == STEPS and all(np.isfinite(m["loss"]) for m in ms)
    cfg = make_cfg(assets, reference["run_dir"])
    specs = get_task("ppo").models(types.SimpleNamespace(cfg=cfg, model_cfg=result.model_config))
    for name, (mc, src) in specs.items():
        start = run_lib.initial_params(cfg, mc, result.mesh, run_lib.mesh_lib.DEFAULT_RULES, source=src)
        for (path, a), b in zip(jax.tree.leaves_with_path(start), jax.tree.leaves(result.params[name])):
            assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0, (name, jax.tree_util.keystr(path))
    for k in ("policy_loss", "value_loss", "clip_ratio", "approx_kl", "entropy", "score", "reward", "kl",
              "kl_coef", "explained_variance", "completions/mean_length", "value_clipfrac"):
        assert k in ms[0], k


def test_first_update_has_ratio_one_and_no_kl(reference):
    m = reference["metrics"][0]
    assert m["clip_ratio"] == 0 and m["approx_kl"] == pytest.approx(0.0, abs=1e-10)
    assert m["kl"] == pytest.approx(0.0, abs=1e-5)  # the actor is the reference before its first update
    assert m["reward"] == pytest.approx(m["score"], abs=1e-5)
    # the second epoch over the same episode data sees the moved policy: its ratio is no longer 1
    assert reference["metrics"][2]["approx_kl"] > 0


def test_episode_reuses_its_collected_batches(reference):
    ms = reference["metrics"]  # 2 collect batches x 2 epochs: steps 1, 3 and 2, 4 train on the same batch
    assert ms[0]["score"] == ms[2]["score"] and ms[1]["score"] == ms[3]["score"]


def test_hf_reward_model_scores_like_the_run(assets, reference, tmp_path):
    _, ms = run(assets, tmp_path, "ppo.num_collect_steps=2", "ppo.ppo_epochs=2",
                f"ppo.reward_model={os.path.join(assets['rm'], 'hf')}", f"ppo.critic_path={assets['rm']}")
    np.testing.assert_allclose([m["score"] for m in ms], [m["score"] for m in reference["metrics"]], atol=1e-4)


def test_resume_continues_the_same_episodes(reference, assets, tmp_path):
    common = ("ppo.num_collect_steps=2", "ppo.ppo_epochs=2", "checkpoint.every=4")
    run(assets, tmp_path, *common, "train.steps=4")
    _, ms = run(assets, tmp_path, *common, "train.steps=8")
    assert [m["step"] for m in ms] == list(range(1, 9))
    _, full = run(assets, tmp_path / "whole", *common, "train.steps=8")
    for k in ("loss", "score", "value_loss"):
        np.testing.assert_allclose([m[k] for m in ms], [m[k] for m in full], atol=1e-5, err_msg=k)


def test_run_directory_loads_as_the_policy(reference):
    lm = loading.from_pretrained(reference["run_dir"])
    assert lm.config.lm_head and not lm.config.num_labels
    got = jax.tree.leaves(lm.pure_params())
    want = jax.tree.leaves(reference["result"].params["actor"])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))


def test_ptx_term_is_exact_under_accumulation(assets, tmp_path):
    """ptx adds ptx_coef x the SFT token mean: the rescaling by global token counts (pre_step) makes the loss
    the same for any micro-batch split."""
    # micro-batches of 2 split over 2 data-parallel devices (preflight.check_batch_divides)
    ptx = (f"ppo.ptx_files={assets['sft']}", "ppo.ptx_coef=0.5", "train.steps=2", "mesh.shape=(1,2,4)")
    _, a = run(assets, tmp_path / "a", *ptx)
    _, b = run(assets, tmp_path / "b", *ptx, "train.micro_batch_size=2")
    _, plain = run(assets, tmp_path / "c", "train.steps=2", "mesh.shape=(1,2,4)")
    assert all(m["ptx_loss"] > 0 for m in a)
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], atol=1e-5)
    # the first step's loss is the plain PPO loss plus 0.5 x the ptx token mean
    assert a[0]["loss"] == pytest.approx(plain[0]["loss"] + 0.5 * a[0]["ptx_loss"], abs=1e-4)


@pytest.mark.parametrize("overrides,match", [
    (("ppo.reward_model=",), "ppo.reward_model is not set"),
    (("ppo.kl_estimator=k2",), "kl_estimator"),
    (("ppo.num_collect_steps=3",), "multiples"),
])
def test_bad_config_is_an_error(assets, tmp_path, overrides, match):
    with pytest.raises(JaxalignError, match=match):
        run(assets, tmp_path, *overrides)


def test_eval_reports_the_reward_model_score(assets, tmp_path):
    run(assets, tmp_path, "train.steps=1", f"data.eval_files={assets['prompts']}", "train.eval_before=true",
        "train.eval_every=1")
    ev = [m for m in read_metrics(str(tmp_path)) if "eval/score" in m]
    assert len(ev) == 2 and all(np.isfinite(m["eval/score"]) and m["eval/completions/mean_length"] > 0 for m in ev)


def test_reward_functions_without_a_reward_model(assets, tmp_path):
    """ppo.reward_funcs alone: the score is the function's value (here the completion's length in
    characters, a constant reward model would give none of it); the critic starts from the policy."""
    fn = tmp_path / "rf.py"
    fn.write_text("def chars(prompts, completions, **_):\n    return [float(len(c)) for c in completions]\n")
    result, _ = run(assets, tmp_path / "run", "ppo.reward_model=", f"ppo.reward_funcs={fn}:chars",
                    "ppo.reward_clip=1000.0", "train.steps=1", f"data.eval_files={assets['prompts']}",
                    "train.eval_before=true", "train.eval_every=1")
    ev = [m for m in read_metrics(str(tmp_path / "run")) if "eval/score" in m]
    assert len(ev) == 2
    # the score before training is the mean length of the starting policy's greedy completions (sampler direct)
    from jaxalign import sampling
    from jaxalign.data import formats, templates
    tok = templates.load_tokenizer(assets["tokenizer"])
    renderer = templates.Renderer(tok)
    prompts = [renderer.prompt(formats.normalize(r, "prompt")["prompt"], r.where)
               for r in formats.read_records(assets["prompts"])]
    cfg = make_cfg(assets, tmp_path / "run", "ppo.reward_model=", f"ppo.reward_funcs={fn}:chars")
    start = run_lib.initial_params(cfg, result.model_config, result.mesh, run_lib.mesh_lib.DEFAULT_RULES)
    lm = loading.LM(result.model_config, result.graphdef["actor"], start, result.mesh)
    ids, mask = sampling.left_pad(prompts, tok.pad_token_id)
    out = sampling.generate(lm, ids, mask, max_new_tokens=8, temperature=0.0, stop_token_ids=(tok.eos_token_id,))
    texts = [tok.decode(c, skip_special_tokens=True) for c in sampling.completions(out)]
    assert ev[0]["eval/score"] == pytest.approx(np.mean([len(t) for t in texts]), abs=1e-5)
