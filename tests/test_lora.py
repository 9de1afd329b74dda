"""LoRA (jaxalign/lora.py) for every trainer, against independent checks: the base weights after training are
bit-identical to the checkpoint they came from; zero-initialised B gives the base model's logits and DPO's
ln 2; merged logits equal unmerged ones; `peft` + `transformers` load the exported adapter (and the merged HF
export) with jaxalign's logits, and an adapter made by `peft` loads into jaxalign with peft's logits; resume
restores adapters and their optimizer state as an uninterrupted run has them; a 2x2x2 mesh gives the 1x8
numbers; an int8 base stays close to the float one; GRPO, PPO (critic = a second adapter set) and RM train.

The base is a tiny random HF Llama (untied head) built locally, with the test tokenizer's vocabulary."""
import json
import math
import os
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxalign import JaxalignError, loading, lora
from jaxalign.tree import keystr
from jaxalign.train.registry import get_task
from jaxalign.train.loop import read_metrics, train
from jaxalign.train.run import reference_params
from tests import hf_models
from tests.configs_util import tiny_config
from tests.test_train_preference import preference_records, unpaired_records
from tests.tokenizers_util import make_tokenizer, write_jsonl

STEPS = 4
IDS = np.array([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48], [0, 0, 0, 60, 61, 62, 63, 64, 65, 66]])
MASK = (IDS > 0).astype(np.int32)
MASK[0, 0] = 1


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-assets")
    tok = make_tokenizer(str(d / "tok"))
    hf = hf_models.save_tiny("llama2", str(d / "hf"), vocab_size=320)
    prefs = preference_records(16, 0)
    sft = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
           for r in prefs]
    prompts = [{"prompt": r["prompt"], "answer": "x"} for r in prefs]
    return {"tok": tok, "hf": hf, "pref": write_jsonl(d / "pref.jsonl", prefs),
            "sft": write_jsonl(d / "sft.jsonl", sft), "prompts": write_jsonl(d / "prompts.jsonl", prompts),
            "kto": write_jsonl(d / "kto.jsonl", unpaired_records(16, 1)),
            "cache": str(d / "cache")}


def make_cfg(assets, run_dir, task, *overrides, **fields):
    data = {"sft": assets["sft"], "grpo": assets["prompts"], "ppo": assets["prompts"], "kto": assets["kto"]}.get(
        task, assets["pref"])
    base = dict(model__path=assets["hf"], model__preset="", data__max_length=48, optim__lr=1e-2,
                train__steps=STEPS, train__batch_size=8, checkpoint__async_save=False)
    return tiny_config(task, run_dir, assets["tok"], data, assets["cache"], "lora.rank=4", "lora.alpha=8",
                       "lora.base_dtype=float32", *overrides, **{**base, **fields})


def run(assets, run_dir, task, *overrides, **fields):
    cfg = make_cfg(assets, run_dir, task, *overrides, **fields)
    result = train(cfg, get_task(task), log=quiet)
    return cfg, result, [m for m in read_metrics(str(run_dir)) if "loss" in m]


def leaves(tree):
    return {keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def logits_of(graphdef, params, mesh):
    with jax.set_mesh(mesh):
        return np.asarray(nnx.merge(graphdef, params)(IDS, MASK))


@pytest.fixture(scope="module")
def sft(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-sft")
    cfg, result, ms = run(assets, d, "sft", "lora.dropout=0.1", checkpoint__export_hf=True)
    return {"cfg": cfg, "result": result, "metrics": ms, "run_dir": str(d)}


def hf_logits(model):
    """Logits at the real (non-padding) positions."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.float().numpy()
    return out[MASK > 0]


# ------------------------------------------------------------------------------------- what trains

def test_only_adapters_are_trained_optimised_and_saved(sft, assets):
    r = sft["result"]
    names = leaves(r.params)
    assert names and all(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for k in names)
    assert set(r.model_config.lora_targets) == {f"layers/{m}" for m in ("q", "k", "v", "o", "gate", "up", "down")}
    losses = [m["loss"] for m in sft["metrics"]]
    assert losses[-1] < losses[0]
    # every adapter moved from its initial value (B from zero, A from its random init)
    init = lora.init_trainable(r.model_config, r.frozen, lora.spec(sft["cfg"]), r.mesh, r.rules, sft["cfg"].seed)
    for k, v in leaves(init).items():
        assert not np.array_equal(v, names[k]), k
    # the base is bit-identical to the checkpoint it was loaded from
    base = loading.from_pretrained(assets["hf"], param_dtype="float32")
    want = leaves(base.pure_params())
    got = leaves(r.frozen)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the checkpoint and the optimizer hold adapters only: megabytes for 7B, kilobytes here
    import orbax.checkpoint as ocp
    step_dir = os.path.join(sft["run_dir"], "checkpoints", str(STEPS), "state")
    meta = ocp.PyTreeCheckpointer().metadata(step_dir).item_metadata
    saved = leaves(jax.tree.map(lambda m: np.zeros(()), meta["params"]))
    assert set(saved) == set(names)
    opt_sizes = [math.prod(x.shape) for x in jax.tree.leaves(meta["opt_state"]) if x.shape]
    assert sum(opt_sizes) == 2 * sum(v.size for v in names.values())


def test_fresh_adapters_give_the_base_logits(sft, assets):
    r = sft["result"]
    fresh = lora.init_trainable(r.model_config, r.frozen, None, r.mesh, r.rules, 0)
    assert all(not np.any(v) for k, v in leaves(fresh).items() if k.endswith("lora_b"))
    adapted = logits_of(r.graphdef, lora.combine(r.frozen, fresh), r.mesh)
    base_graphdef = lora.reference_graphdef(r.model_config, r.frozen)
    np.testing.assert_array_equal(adapted, logits_of(base_graphdef, r.frozen, r.mesh))  # same mesh: exact
    base = loading.from_pretrained(assets["hf"], param_dtype="float32")  # one device
    np.testing.assert_allclose(adapted, np.asarray(base(IDS, MASK)), atol=1e-5)


def test_merged_equals_unmerged_and_run_dir_loads_merged(sft):
    r = sft["result"]
    unmerged = logits_of(r.graphdef, lora.combine(r.frozen, r.params), r.mesh)
    merged = r.model()
    assert merged.config.lora_rank == 0 and "lora_a" not in str(jax.tree.structure(merged.pure_params()))
    np.testing.assert_allclose(np.asarray(merged(IDS, MASK)), unmerged, atol=1e-5)
    assert np.abs(unmerged - logits_of(r.graphdef, lora.combine(
        r.frozen, jax.tree.map(np.zeros_like, r.params)), r.mesh)).max() > 1e-3  # the adapters matter
    loaded = loading.from_pretrained(sft["run_dir"])
    np.testing.assert_allclose(np.asarray(loaded(IDS, MASK)), unmerged, atol=1e-5)


def test_peft_and_transformers_load_the_exports(sft, assets):
    import peft
    import transformers
    r = sft["result"]
    ours = np.asarray(r.model()(IDS, MASK))[MASK > 0]
    cfg = json.load(open(os.path.join(sft["run_dir"], "adapter", "adapter_config.json")))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    base = transformers.AutoModelForCausalLM.from_pretrained(assets["hf"], dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, os.path.join(sft["run_dir"], "adapter")).eval()
    np.testing.assert_allclose(hf_logits(with_adapter), ours, atol=1e-4)
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(sft["run_dir"], "hf"),
                                                               dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(merged), ours, atol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_for_sampling_and_training(assets, tmp_path, rslora):
    import peft
    import transformers
    base = transformers.AutoModelForCausalLM.from_pretrained(assets["hf"], dtype=torch.float32).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, use_rslora=rslora, modules_to_save=["lm_head"])
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    want = hf_logits(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    lm = loading.from_pretrained(assets["hf"], adapter=str(tmp_path / "adapter"))
    np.testing.assert_allclose(np.asarray(lm(IDS, MASK))[MASK > 0], want, atol=1e-4)
    if rslora:
        return
    # continue training from it: with lr 0 the adapters stay exactly what peft wrote
    cfg, result, _ = run(assets, tmp_path / "run", "sft", f"lora.init_from={tmp_path / 'adapter'}",
                         "lora.rank=8", train__steps=1, optim__lr=0.0)
    assert result.model_config.lora_rank == 4  # the adapter's own settings win
    assert set(result.model_config.lora_targets) == {"layers/q", "layers/v", "layers/down"}
    assert "lm_head" in result.params
    np.testing.assert_allclose(np.asarray(result.model()(IDS, MASK))[MASK > 0], want, atol=1e-4)


def test_peft_dora_is_refused(assets, tmp_path):
    d = tmp_path / "dora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "use_dora": True}))
    with pytest.raises(JaxalignError, match="use_dora"):
        loading.from_pretrained(assets["hf"], adapter=str(d))


# ------------------------------------------------------------------------------ reference, resume, mesh

@pytest.fixture(scope="module")
def dpo(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-dpo")
    cfg, result, ms = run(assets, d, "dpo", **{"mesh__shape": (1, 8, 1)})
    return {"cfg": cfg, "result": result, "metrics": ms}


def test_dpo_starts_at_ln2_with_the_base_as_reference(dpo):
    losses = [m["loss"] for m in dpo["metrics"]]
    assert abs(losses[0] - math.log(2.0)) < 1e-6 and losses[-1] < losses[0]
    r = dpo["result"]
    assert reference_params(types.SimpleNamespace(base=r.frozen)) is r.frozen


def test_mesh_2x2x2_gives_the_1x8_numbers(dpo, assets, tmp_path):
    _, result, ms = run(assets, tmp_path, "dpo", **{"mesh__shape": (2, 2, 2)})
    np.testing.assert_allclose([m["loss"] for m in ms], [m["loss"] for m in dpo["metrics"]], rtol=1e-5)
    a, b = leaves(result.params), leaves(dpo["result"].params)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)
    lora_b = result.params["layers"]["q"]["lora_b"]  # [layers, r, heads, head_dim]: heads over `model`
    assert "model" in str(lora_b.sharding.spec)


def test_resume_restores_adapters_and_optimizer_state(sft, assets, tmp_path):
    run(assets, tmp_path, "sft", "lora.dropout=0.1", train__steps=2, checkpoint__every=2)
    _, resumed, ms = run(assets, tmp_path, "sft", "lora.dropout=0.1", checkpoint__every=2)
    straight = sft["result"]
    for k, v in leaves(straight.params).items():
        np.testing.assert_allclose(leaves(resumed.params)[k], v, atol=1e-6, err_msg=k)
    np.testing.assert_allclose([m["loss"] for m in ms][-2:], [m["loss"] for m in sft["metrics"]][-2:], rtol=1e-6)


# ------------------------------------------------------------------------------------ int8, RL, RM

def test_int8_base_is_close_and_trains(assets, tmp_path):
    cfg, result, ms = run(assets, tmp_path, "dpo", "lora.base_dtype=int8", train__steps=2)
    q = result.frozen["layers"]["q"]
    assert q["kernel"].dtype == np.int8 and q["kernel_scale"].dtype == np.float32
    assert abs(ms[0]["loss"] - math.log(2.0)) < 1e-6
    fresh = jax.tree.map(np.zeros_like, result.params)
    got = logits_of(result.graphdef, lora.combine(result.frozen, fresh), result.mesh)
    want = np.asarray(loading.from_pretrained(assets["hf"], param_dtype="float32")(IDS, MASK))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_int8_halves_the_base_bytes_of_a_7b_model():
    from jaxalign.config import apply_overrides, base_config
    from jaxalign.models.presets import get_preset
    from jaxalign.train.memory import estimate
    model = get_preset("llama2_7b", dtype="bfloat16", param_dtype="float32", remat="full")
    est = {}
    for dtype in ("bfloat16", "int8"):
        cfg = apply_overrides(base_config(), ["task=dpo", "lora.rank=16", f"lora.base_dtype={dtype}",
                                              "mesh.shape=(1,1,1)"])
        est[dtype] = estimate(cfg, lora.adapted_config(model, lora.spec(cfg)), 1, get_task("dpo"))
    assert round(est["bfloat16"]["base"] / 2**30, 2) == 12.55
    assert est["int8"]["base"] < 0.53 * est["bfloat16"]["base"]
    assert est["bfloat16"]["reference"] == 0 and est["bfloat16"]["optimizer"] < 0.4 * 2**30


def test_grpo_with_lora_trains_adapters_against_the_base(assets, tmp_path):
    # a bf16 base: KL 0 on the first step only if the reference is that base (a separately loaded reference
    # would be float32)
    _, result, ms = run(assets, tmp_path, "grpo", "grpo.beta=0.1", "grpo.num_generations=4", "lora.base_dtype=bfloat16",
                        "grpo.max_completion_length=8", "grpo.reward_funcs=tests.grpo_rewards:e_fraction",
                        train__batch_size=4, train__steps=2)
    assert ms[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert any(np.any(v) for k, v in leaves(result.params).items() if k.endswith("lora_b"))


def test_rm_then_ppo_whose_critic_is_a_second_adapter_set(assets, tmp_path):
    _, rm, rm_metrics = run(assets, tmp_path / "rm", "rm", train__steps=3, checkpoint__export_hf=True)
    assert "score" in rm.params and rm_metrics[-1]["loss"] < rm_metrics[0]["loss"]
    _, result, ms = run(assets, tmp_path / "ppo", "ppo", f"ppo.reward_model={tmp_path / 'rm'}",
                        "lora.base_dtype=bfloat16",
                        "ppo.max_completion_length=8", "mesh.shape=(1,4,2)", train__batch_size=4, train__steps=2)
    actor, critic = leaves(result.params["actor"]), leaves(result.params["critic"])
    assert all(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for k in actor)
    assert "score/kernel" in critic and any(np.any(v) for k, v in critic.items() if k.endswith("lora_b"))
    assert ms[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert "lm_head" not in result.frozen["critic"] and result.frozen["critic"]["embed"] is \
        result.frozen["actor"]["embed"]  # one base in memory


@pytest.mark.parametrize("task", ["kto", "orpo"])
def test_other_preference_trainers_train_adapters(assets, tmp_path, task):
    _, result, ms = run(assets, tmp_path, task)
    assert ms[-1]["loss"] < ms[0]["loss"]
    assert all(np.any(v) for k, v in leaves(result.params).items() if k.endswith("lora_b"))


def test_targets_that_match_nothing_are_an_error(assets, tmp_path):
    with pytest.raises(JaxalignError, match="matches no Linear kernel.*layers/q/kernel"):
        run(assets, tmp_path, "sft", "lora.targets=attn_q")


def test_dry_run_reports_the_base_and_compiles_the_lora_step(assets, tmp_path):
    from jaxalign.train.dryrun import dry_run
    lines = []
    cfg = make_cfg(assets, tmp_path / "never", "dpo", "lora.base_dtype=int8", **{"mesh__shape": (2, 2, 2)})
    out = dry_run(cfg, get_task("dpo"), log=lines.append)
    text = "\n".join(lines)
    assert "  base " in text and "compiled train step" in text, text
    assert out["estimate"]["reference"] == 0 and out["estimate"]["base"] > 0
    assert not (tmp_path / "never").exists()


def test_convert_to_hf_merges_a_lora_run_and_a_peft_adapter(sft, assets, tmp_path):
    import transformers
    from jaxalign import cli
    want = np.asarray(sft["result"].model()(IDS, MASK))[MASK > 0]
    cli.main(["convert", "--to-hf", sft["run_dir"], "--out", str(tmp_path / "a")])
    cli.main(["convert", "--to-hf", assets["hf"], "--adapter", os.path.join(sft["run_dir"], "adapter"),
              "--out", str(tmp_path / "b")])
    for out in ("a", "b"):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / out), dtype=torch.float32).eval()
        np.testing.assert_allclose(hf_logits(model), want, atol=1e-4)


def test_lora_run_from_a_random_init_says_why_it_cannot_load(assets, tmp_path):
    run(assets, tmp_path, "sft", model__path="", model__preset="tiny", train__steps=1)
    with pytest.raises(JaxalignError, match="random init"):
        loading.from_pretrained(str(tmp_path))
