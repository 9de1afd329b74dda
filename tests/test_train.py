"""The training spine end to end on a tiny from-scratch model (8 simulated CPU devices): loss falls and
every parameter moves, kill -9 and resume reproduces an uninterrupted run, micro-batch accumulation and
mesh shape do not change the numbers, the NaN guard, config errors, HF export, init_from, eval, packing.

Every run uses the same model, data, schedule (constant, so the number of steps does not change the
compiled step) and batch shape where it can, so the persistent compilation cache is shared across runs
and with the `jaxalign train` subprocesses.
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import JaxalignError, checkpoint, loading
from jaxalign.config import load_config
from jaxalign.data import pipeline
from jaxalign.train.hooks import NonFiniteError
from jaxalign.train.loop import read_metrics, train
from jaxalign.train.task import Task
from jaxalign.train.sft import TASK as SFT, sft_loss
from tests.configs_util import tiny_config
from tests.tokenizers_util import make_tokenizer, write_jsonl

STEPS = 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ fixtures

def sort_conversations(n, seed):
    """`3 1 2` -> `1 2 3`: 24-28 tokens each with the test tokenizer (fits max_length 32 untruncated)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        xs = [rng.randint(0, 9) for _ in range(3)]
        out.append({"messages": [{"role": "user", "content": " ".join(map(str, xs))},
                                 {"role": "assistant", "content": " ".join(map(str, sorted(xs)))}]})
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("train-assets")
    return {
        "tokenizer": make_tokenizer(str(d / "tokenizer")),
        "train": write_jsonl(d / "train.jsonl", sort_conversations(64, 0)),
        "eval": write_jsonl(d / "eval.jsonl", sort_conversations(20, 1)),  # 20: the last eval batch is partial
        "cache": str(d / "data-cache"),
    }


def make_cfg(assets, run_dir, *overrides, **fields):
    """The shared tiny SFT config; `fields` as section__key=value (root__key for top-level keys), `overrides`
    as 'a.b=value' strings."""
    fields = {k.replace("root__", ""): v for k, v in fields.items()}
    return tiny_config("sft", run_dir, assets["tokenizer"], assets["train"], assets["cache"], *overrides,
                       optim__lr=3e-3, train__steps=STEPS, train__batch_size=8, train__micro_batch_size=8, **fields)


def quiet(*_):
    pass


def losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def train_steps(run_dir):
    return [m["step"] for m in read_metrics(run_dir) if "loss" in m]


def leaves(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(params)}


def assert_params_close(a, b, atol):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_allclose(la[k], lb[k], atol=atol, rtol=0, err_msg=k)


def restore_target(params):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)


def checkpoint_params(run_dir, step, like):
    return checkpoint.restore_run_params(str(run_dir), restore_target(like), step=step)


@pytest.fixture(scope="module")
def base(assets, tmp_path_factory):
    """The reference run: 12 steps, batch 8 in one micro-batch, default mesh (1, 8, 1), eval every 6 steps,
    HF export; plus its initial parameters (a 0-step run of the same config)."""
    run_dir = tmp_path_factory.mktemp("base-run")
    cfg = make_cfg(assets, run_dir, "data.eval_files=" + assets["eval"], "train.eval_every=6",
                   "checkpoint.export_hf=true")
    result = train(cfg, SFT, log=quiet)
    init = train(make_cfg(assets, tmp_path_factory.mktemp("base-init"), "train.steps=0"), SFT, log=quiet)
    return {"cfg": cfg, "result": result, "init": init.params, "run_dir": str(run_dir)}


# ------------------------------------------------------------------------------ 1. loss and params

def test_loss_falls_and_every_parameter_changes(base):
    result = base["result"]
    assert result.step == STEPS
    steps, ls = train_steps(base["run_dir"]), losses(base["run_dir"])
    assert steps == list(range(1, STEPS + 1))
    assert all(np.isfinite(ls))
    assert np.mean(ls[-3:]) < 0.75 * np.mean(ls[:3]), ls
    assert result.metrics["loss"] == ls[-1]
    init, final = leaves(base["init"]), leaves(result.params)
    assert init.keys() == final.keys() and len(init) >= 10
    for name in init:
        assert init[name].shape == final[name].shape, name
        assert np.all(np.isfinite(final[name])), name
        assert not np.array_equal(init[name], final[name]), f"{name} did not change"
        if name.startswith("['layers']"):  # stacked layers: each layer's slice moved
            for i in range(init[name].shape[0]):
                assert not np.array_equal(init[name][i], final[name][i]), f"{name}[{i}] did not change"
    m = read_metrics(base["run_dir"])[0]
    for key in ("loss", "grad_norm", "lr", "nonfinite", "token_accuracy", "entropy", "exact_match",
                "tokens_per_sec"):
        assert key in m, key
    assert m["nonfinite"] == 0.0 and m["lr"] == pytest.approx(3e-3)


def test_run_dir_layout(base):
    run_dir = base["run_dir"]
    for name in ("config.json", "jaxalign_config.json", "metrics.jsonl", "tokenizer.json", "tensorboard"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert checkpoint.latest_run_step(run_dir) == STEPS  # the last step is always saved
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    assert saved["train"]["steps"] == STEPS and saved["model"]["preset"] == "tiny"


def test_initial_params_helper_matches_zero_step_run(base, assets, tmp_path):
    from jaxalign.data import templates
    from jaxalign.parallel import mesh as mesh_lib
    from jaxalign.train import run as run_lib
    cfg = make_cfg(assets, tmp_path)
    tok = templates.load_tokenizer(cfg.tokenizer.path)
    mesh = mesh_lib.make_mesh(cfg.mesh.shape)
    rules = mesh_lib.normalize_rules(cfg.mesh.rules)
    model_cfg = run_lib.model_config(cfg, tok)
    assert model_cfg.vocab_size == -(-len(tok) // 64) * 64 and model_cfg.vocab_size >= len(tok)
    assert_params_close(run_lib.initial_params(cfg, model_cfg, mesh, rules), base["init"], atol=0)


# ------------------------------------------------------------------------------ 2. kill and resume

RECIPE = '''
import os
import time

import ml_collections


def get_config():
    slow = float(os.environ.get("JAXALIGN_TEST_SLOW_STEP", "0"))
    if slow:  # test hook: pause after each logged step so that the run can be killed mid-way
        from jaxalign.train import metrics
        write = metrics.MetricsWriter.write

        def slow_write(self, step, values):
            write(self, step, values)
            time.sleep(slow)
        metrics.MetricsWriter.write = slow_write
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.model = dict(preset="tiny", dtype="float32", param_dtype="float32")
    c.tokenizer = dict(path={tokenizer!r})
    c.data = dict(train_files={train!r}, max_length=32)
    c.optim = dict(lr=3e-3, schedule="constant")
    c.train = dict(steps=100, batch_size=8, micro_batch_size=8, log_every=10, progress=False)
    c.checkpoint = dict(every=100)
    return c
'''


def read_lines_safely(path):
    """metrics.jsonl lines of a running process (a half-written last line is skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def test_kill_and_resume_matches_uninterrupted_run(assets, tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE.format(tokenizer=assets["tokenizer"], train=assets["train"]))
    env = dict(os.environ, JAXALIGN_DATA_CACHE=assets["cache"],
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=REPO)
    env.pop("JAXALIGN_TEST_SLOW_STEP", None)

    def command(run_dir):
        return [sys.executable, "-m", "jaxalign.cli", "train", "--config", str(recipe),
                f"--config.run_dir={run_dir}", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
                "--config.checkpoint.every=4", "--config.model.dtype=float32"]

    killed, straight = tmp_path / "killed", tmp_path / "straight"
    logs = {f"{n}.{s}": open(tmp_path / f"{n}.{s}", "w") for n in ("straight", "killed") for s in ("out", "err")}
    # The uninterrupted run goes alongside the one to be killed.
    ref = subprocess.Popen(command(straight), env=env, stdout=logs["straight.out"], stderr=logs["straight.err"],
                           cwd=tmp_path)
    proc = None
    try:
        proc = subprocess.Popen(command(killed), env=dict(env, JAXALIGN_TEST_SLOW_STEP="0.5"),
                                stdout=logs["killed.out"], stderr=logs["killed.err"], cwd=tmp_path)
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, "the run finished before it could be killed: " + (
                tmp_path / "killed.err").read_text()[-3000:]
            logged = [m["step"] for m in read_lines_safely(killed / "metrics.jsonl")]
            if checkpoint.latest_run_step(str(killed)) is not None and max(logged, default=0) >= 5:
                break
            assert time.time() < deadline, "timed out waiting for a checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        saved = checkpoint.latest_run_step(str(killed))
        logged = [m["step"] for m in read_lines_safely(killed / "metrics.jsonl")]
        assert saved in (4, 8) and max(logged) < STEPS, (saved, logged)
        kept = [m for m in read_lines_safely(killed / "metrics.jsonl") if m["step"] <= saved]

        again = subprocess.run(command(killed), env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.splitlines()[0] == f"resuming from step {saved}", again.stdout
        assert f"done: step {STEPS}" in again.stdout
        assert ref.wait(timeout=300) == 0, (tmp_path / "straight.err").read_text()[-3000:]
    finally:
        for p in (ref, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for f in logs.values():
            f.close()

    assert "resuming" not in (tmp_path / "straight.out").read_text()
    # Every step exactly once, and the very same losses as the uninterrupted run.
    assert train_steps(killed) == list(range(1, STEPS + 1))
    assert train_steps(straight) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses(killed), losses(straight), atol=1e-6, rtol=0)
    # Only the steps after the checkpoint were re-run: the lines up to it are the killed process's own
    # (throughput figures included); the final parameters agree too.
    assert read_metrics(killed)[:saved] == kept and len(kept) == saved
    a, b = loading.from_pretrained(str(killed)), loading.from_pretrained(str(straight))
    assert_params_close(a.pure_params(), b.pure_params(), atol=1e-6)


# ------------------------------------------------------------------------ 3. accumulation, 4. mesh

@pytest.mark.parametrize("micro", [4, 2])
def test_accumulation_matches_one_big_batch(base, assets, tmp_path, micro):
    # a micro-batch must split over the data-parallel devices (preflight.check_batch_divides): fsdp = micro
    shape = f"mesh.shape=(1,{micro},{8 // micro})"
    result = train(make_cfg(assets, tmp_path, f"train.micro_batch_size={micro}", shape), SFT, log=quiet)
    np.testing.assert_allclose(losses(tmp_path), losses(base["run_dir"]), atol=1e-5, rtol=0)
    assert_params_close(result.params, base["result"].params, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 4, 2), (2, 2, 2)])
def test_mesh_shape_does_not_change_the_numbers(base, assets, tmp_path, shape):
    # base runs on the default mesh (1, 8, 1): pure FSDP. Compare data-parallel, FSDP x TP and all three.
    result = train(make_cfg(assets, tmp_path, f"mesh.shape={shape}"), SFT, log=quiet)
    assert dict(zip(result.mesh.axis_names, result.mesh.axis_sizes)) == dict(zip(("data", "fsdp", "model"),
                                                                                 shape))
    np.testing.assert_allclose(losses(tmp_path), losses(base["run_dir"]), atol=1e-5, rtol=0)
    # Different reduction orders over 12 Adam steps: an element whose gradient is near zero gets a
    # normalised (O(lr)) update whose sign float noise can tip, hence a looser bound than the losses'.
    assert_params_close(result.params, base["result"].params, atol=1e-4)


# ------------------------------------------------------------------------------------ 5. NaN guard

class PoisonedBatches(pipeline.Batches):
    """Adds a `poison` column: NaN on the (1-based) steps in `nan_steps`, else 1."""
    nan_steps = frozenset()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __next__(self):
        batch = super().__next__()
        self.calls += 1
        bad = self.calls in self.nan_steps
        batch["poison"] = np.full(len(batch["input_ids"]), np.nan if bad else 1.0, np.float32)
        return batch


def poisoned_loss(model, batch, rng, cfg, aux=None):
    loss_sum, denom, metrics = sft_loss(model, batch, rng, cfg, aux)
    return loss_sum * jnp.mean(batch["poison"]), denom, metrics


POISONED = Task("sft", "sft", poisoned_loss)


def test_nan_step_is_skipped_and_the_run_continues(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "Batches", type("P", (PoisonedBatches,), {"nan_steps": frozenset({3})}))
    cfg = make_cfg(assets, tmp_path, "train.steps=5", "checkpoint.every=1", "checkpoint.max_to_keep=0",
                   "train.max_nonfinite_steps=2")
    result = train(cfg, POISONED, log=quiet)
    assert result.step == 5
    ms = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["nonfinite"] for m in ms] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert np.isnan(ms[2]["loss"]) and all(np.isfinite(m["loss"]) for i, m in enumerate(ms) if i != 2)
    like = result.params
    p2, p3, p4 = (checkpoint_params(tmp_path, s, like) for s in (2, 3, 4))
    assert_params_close(p3, p2, atol=0)  # the NaN step changed nothing
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(p3).values(), leaves(p4).values()))
    for x in jax.tree.leaves(result.params):
        assert np.all(np.isfinite(np.asarray(x)))


def test_optimizer_state_untouched_by_a_nan_step(assets, tmp_path, monkeypatch):
    """All-NaN steps: the parameters stay the initial ones exactly (and Adam's moments stay zero, so a
    later good step is a first Adam step)."""
    monkeypatch.setattr(pipeline, "Batches", type("P", (PoisonedBatches,), {"nan_steps": frozenset({1, 2, 3})}))
    cfg = make_cfg(assets, tmp_path, "train.steps=3", "train.max_nonfinite_steps=5")
    result = train(cfg, POISONED, log=quiet)
    init = train(make_cfg(assets, tmp_path / "init", "train.steps=0"), SFT, log=quiet).params
    assert_params_close(result.params, init, atol=0)
    assert [m["nonfinite"] for m in read_metrics(tmp_path) if "loss" in m] == [1.0, 1.0, 1.0]


def test_too_many_nan_steps_raise_and_checkpoint_is_finite(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "Batches",
                        type("P", (PoisonedBatches,), {"nan_steps": frozenset(range(4, 100))}))
    cfg = make_cfg(assets, tmp_path, "checkpoint.every=2", "train.max_nonfinite_steps=3")
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        train(cfg, POISONED, log=quiet)
    assert checkpoint.latest_run_step(str(tmp_path)) == 4  # steps 4, 5, 6 were bad; 6 was not saved
    like = train(make_cfg(assets, tmp_path / "init", "train.steps=0"), SFT, log=quiet).params
    p4 = checkpoint_params(tmp_path, 4, like)
    for name, x in leaves(p4).items():
        assert np.all(np.isfinite(x)), name
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(p4).values(), leaves(like).values()))
    ms = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["nonfinite"] for m in ms][:5] == [0.0, 0.0, 0.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------- 6. config errors

def test_unknown_recipe_field_is_an_error(tmp_path):
    recipe = tmp_path / "typo.py"
    recipe.write_text(textwrap.dedent("""
        import ml_collections

        def get_config():
            c = ml_collections.ConfigDict()
            c.task = "sft"
            c.data = ml_collections.ConfigDict()
            c.data.max_lenght = 3
            return c
    """))
    with pytest.raises(JaxalignError, match=r"'data\.max_lenght'"):
        load_config(str(recipe))


def test_unknown_override_exits_2_with_one_line(tmp_path, capsys):
    from jaxalign.cli import main
    recipe = tmp_path / "ok.py"
    recipe.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict()\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(recipe), "--config.train.stepz=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxalign: error:") and "'train.stepz'" in err, err


def test_unknown_override_from_the_command_line(tmp_path):
    recipe = tmp_path / "ok.py"
    recipe.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict()\n")
    out = subprocess.run([sys.executable, "-m", "jaxalign.cli", "train", "--config", str(recipe),
                          "--config.train.stepz=3"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "'train.stepz'" in out.stderr, out.stderr


def test_bad_mesh_shape_exits_2_with_one_line(assets, tmp_path, capsys):
    from jaxalign.cli import main
    recipe = tmp_path / "ok.py"
    recipe.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict()\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(recipe), f"--config.run_dir={tmp_path / 'run'}",
              "--config.model.preset=tiny", f"--config.tokenizer.path={assets['tokenizer']}",
              f"--config.data.train_files={assets['train']}", "--config.data.max_length=32",
              f"--config.data.cache_dir={assets['cache']}", "--config.mesh.shape=(3,1,1)"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mesh.shape" in err, err


def test_micro_batch_must_divide_batch(assets, tmp_path):
    with pytest.raises(JaxalignError, match="micro_batch_size"):
        train(make_cfg(assets, tmp_path, "train.micro_batch_size=3"), SFT, log=quiet)


# ----------------------------------------------------------------------------------------- 7. export

def hf_logits(hf_dir, ids):
    import torch
    import transformers
    model, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True,
                                                                    dtype=torch.float32)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (k, info)
    with torch.no_grad():
        return model.eval()(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def test_export_hf_loads_in_transformers(base, tmp_path):
    run_dir = base["run_dir"]
    hf_dir = os.path.join(run_dir, "hf")
    assert os.path.isfile(os.path.join(hf_dir, "config.json"))
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
    lm = loading.from_pretrained(run_dir)  # a run directory: its latest checkpoint
    assert_params_close(lm.pure_params(), base["result"].params, atol=0)
    ids = np.random.default_rng(0).integers(3, 300, size=(2, 16)).astype(np.int32)
    ours = np.asarray(lm(ids))
    assert ours.shape == (2, 16, base["result"].model_config.vocab_size)
    np.testing.assert_allclose(hf_logits(hf_dir, ids), ours, atol=1e-4, rtol=0)

    # jaxalign convert --to-hf RUN_DIR writes the same tensors.
    from safetensors.numpy import load_file

    from jaxalign.cli import main
    out = str(tmp_path / "converted")
    main(["convert", "--to-hf", run_dir, "--out", out])
    st = lambda d: {k: v for f in sorted(os.listdir(d)) if f.endswith(".safetensors")
                    for k, v in load_file(os.path.join(d, f)).items()}
    exported, converted = st(hf_dir), st(out)
    assert exported.keys() == converted.keys() and exported
    for k in exported:
        np.testing.assert_array_equal(exported[k], converted[k], err_msg=k)


# -------------------------------------------------------------------------------------- 8. init_from

def test_init_from_a_run_directory(base, assets, tmp_path):
    # No model preset: the architecture comes from the run directory (jaxalign_config.json).
    cfg = make_cfg(assets, tmp_path / "zero", "train.steps=0", f"init_from={base['run_dir']}", "model.preset=")
    zero = train(cfg, SFT, log=quiet)
    assert zero.model_config == base["result"].model_config
    assert_params_close(zero.params, base["result"].params, atol=0)
    # Training from there: the first batch (the same as the base run's first batch) already has a low loss.
    cfg = make_cfg(assets, tmp_path / "one", "train.steps=1", f"init_from={base['run_dir']}")
    train(cfg, SFT, log=quiet)
    first, base_losses = losses(tmp_path / "one")[0], losses(base["run_dir"])
    assert first < base_losses[0] - 1.0 and first < base_losses[-1] + 0.5, (first, base_losses)


def test_init_from_supplies_the_tokenizer(base, assets, tmp_path):
    cfg = make_cfg(assets, tmp_path, "train.steps=0", f"init_from={base['run_dir']}", "tokenizer.path=",
                   "model.preset=")
    zero = train(cfg, SFT, log=quiet)
    assert_params_close(zero.params, base["result"].params, atol=0)


# ------------------------------------------------------------------------------------------- 9. eval

def test_eval_metrics_logged(base):
    ev = [m for m in read_metrics(base["run_dir"]) if "eval/loss" in m]
    assert [m["step"] for m in ev] == [6, 12]
    for m in ev:
        for key in ("eval/loss", "eval/token_accuracy", "eval/exact_match", "eval/entropy"):
            assert key in m and np.isfinite(m[key]), key
        assert 0.0 <= m["eval/token_accuracy"] <= 1.0 and 0.0 <= m["eval/exact_match"] <= 1.0
    assert ev[1]["eval/loss"] < ev[0]["eval/loss"]
    assert base["result"].eval_metrics == {k: v for k, v in ev[1].items() if k not in ("step", "time")}


def test_eval_metrics_match_numpy(base, assets):
    """eval/* at the last step against a NumPy computation over all 20 eval rows from the final params
    (the last, partial batch must count its real rows only)."""
    data = pipeline.prepare_from_config(base["cfg"], "eval", log=quiet, kind="sft")
    rows = [data.dataset[i] for i in range(len(data))]
    assert len(rows) == 20
    T = 32
    ids = np.zeros((20, T), np.int32)
    att = np.zeros((20, T), np.int32)
    cm = np.zeros((20, T), np.int32)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], att[i, :n], cm[i, :n] = r["input_ids"], 1, r["completion_mask"]
    lm = loading.from_pretrained(base["run_dir"])
    logits = np.asarray(lm(ids, att), np.float64)[:, :-1]
    z = logits - logits.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    tgt, mask = ids[:, 1:], cm[:, 1:].astype(np.float64)
    logp = np.take_along_axis(logp_all, tgt[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == tgt
    want = {"eval/loss": -(logp * mask).sum() / mask.sum(),
            "eval/token_accuracy": (correct * mask).sum() / mask.sum(),
            "eval/exact_match": np.mean([np.all(correct[i][mask[i] > 0]) for i in range(20)])}
    got = base["result"].eval_metrics
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-4), k


# ---------------------------------------------------------------------------------------- 10. packing

def test_packing_trains(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path, "data.packing=true", "data.max_length=64")
    result = train(cfg, SFT, log=quiet)
    ls = losses(tmp_path)
    assert len(ls) == STEPS and all(np.isfinite(ls))
    assert np.mean(ls[-3:]) < 0.75 * np.mean(ls[:3]), ls
    assert result.metrics["tokens_per_sec"] > 0
    # Two conversations per 64-token row: 64 examples -> 32 rows.
    data = pipeline.prepare_from_config(cfg, "train", log=quiet, kind="sft")
    it = pipeline.Batches(data, 8, packing=True, shuffle=False)
    assert len(it.units(0)) == 32
    batch = next(it)
    assert batch["input_ids"].shape == (8, 64) and batch["segment_ids"].max() == 2


def test_packed_loss_equals_sum_of_unpacked(assets):
    """The SFT task on packed rows gives the same loss sum, token count and accuracy as on the same
    conversations unpacked (no attention or prediction across segment boundaries)."""
    cfg = make_cfg(assets, "/nonexistent", "data.max_length=64")
    data = pipeline.prepare_from_config(cfg, "train", log=quiet, kind="sft")
    from jaxalign.data import templates
    from jaxalign.train import run as run_lib
    model_cfg = run_lib.model_config(cfg, templates.load_tokenizer(cfg.tokenizer.path))
    lm = loading.from_config(model_cfg, seed=1)

    @jax.jit
    def task_loss(params, batch):
        loss_sum, denom, mets = SFT.loss(nnx.merge(lm.graphdef, params), batch, None, cfg)
        return loss_sum, denom, mets["token_accuracy"][0]

    def run(batch):
        keys = ("input_ids", "attention_mask", "completion_mask", "segment_ids", "positions")
        return [float(x) for x in task_loss(lm.params, {k: jnp.asarray(batch[k]) for k in keys if k in batch})]

    packed = pipeline.Batches(data, 8, packing=True, shuffle=False)
    plain = pipeline.Batches(data, 8, packing=False, shuffle=False)
    units = packed.units(0)[:8]
    assert all(len(u) == 2 for u in units) and [i for u in units for i in u] == list(range(16))
    p = run(next(packed))
    u = np.sum([run(next(plain)) for _ in range(2)], axis=0)
    np.testing.assert_allclose(p, u, rtol=1e-5)


def test_host_rows_counts_every_sequence_the_step_runs():
    """The FLOPs/MFU numerator counts sequences: chosen + rejected for pairs, all generations for RL."""
    from jaxalign.train.hooks import host_rows
    z = lambda n: np.zeros((n, 4), np.int32)
    assert host_rows({"input_ids": z(8), "attention_mask": z(8), "weight": np.ones(8)}) == 8
    assert host_rows({"chosen_input_ids": z(8), "rejected_input_ids": z(8), "margin": np.ones(8)}) == 16
