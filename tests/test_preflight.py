"""Pre-flight checks (issue 23): a config or command that cannot work ends in one line `jaxalign: error: ...`
naming the field, exit 2, no traceback, and no run directory; a device OOM becomes one line saying what to
lower; warmup longer than the run and simulated devices larger than the host's free memory are warned about.
The refusals are run as `python -m jaxalign.cli` subprocesses (8 simulated CPU devices), the rest in process."""
import os
import subprocess
import sys
import types

import jax
import pytest

from jaxalign import JaxalignError, cli
from jaxalign.models.presets import get_preset
from jaxalign.train import preflight
from jaxalign.train import run as run_lib
from jaxalign.train.registry import get_task
from tests.configs_util import tiny_config
from tests.tokenizers_util import make_tokenizer, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = [{"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Yes."}]}] * 8
RECIPE = """import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.model = dict(preset="tiny")
    c.tokenizer = dict(path={tok!r})
    c.data = dict(train_files={train!r}, max_length=32, cache_dir={cache!r})
    c.train = dict(steps=2, batch_size=8, progress=False)
    return c
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("preflight")
    tok = make_tokenizer(str(d / "tok"))
    train = write_jsonl(d / "sft.jsonl", SFT)
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": "Hello there"}] * 8)
    recipe = d / "recipe.py"
    recipe.write_text(RECIPE.format(tok=tok, train=train, cache=str(d / "cache")))
    return {"tok": tok, "sft": train, "prompts": prompts, "recipe": str(recipe), "cache": str(d / "cache")}


GRPO = ("task=grpo", "grpo.reward_funcs=tests.grpo_rewards:e_fraction")

# (case, extra --config overrides (the prompts file replaces {prompts}), what the error line must name)
TRAIN_CASES = [
    ("max_length over the tiny preset's 512 positions", ("data.max_length=1024",), "data.max_length 1024"),
    ("prompt + completion over the positions",
     GRPO + ("data.train_files={prompts}", "grpo.num_generations=8", "grpo.max_completion_length=500"),
     "grpo.max_completion_length 500"),
    ("batch 12 on fsdp 8", ("train.batch_size=12",), "train.batch_size 12"),
    ("micro-batch 4 on fsdp 8", ("train.micro_batch_size=4",), "train.micro_batch_size 4"),
    ("GRPO rows 3 x 2 on fsdp 8", GRPO + ("data.train_files={prompts}", "train.batch_size=3", "grpo.num_generations=2"),
     "grpo.num_generations 2"),
    ("a model.path that does not exist (the tokenizer would come from it)",
     ("model.path=/nonexistent/model", "model.preset=", "tokenizer.path="), "model.path: /nonexistent/model"),
    ("init_from that does not exist", ("init_from=/nonexistent/start",), "init_from: /nonexistent/start"),
]


def cli_run(args):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "jaxalign.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def assert_one_error_line(out, names):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxalign: error: ") and names in lines[0], out.stderr


@pytest.mark.parametrize("case,overrides,names", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_with_one_line_and_no_run_directory(assets, tmp_path, case, overrides, names):
    run_dir = tmp_path / "run"
    out = cli_run(["train", "--config", assets["recipe"], f"--config.run_dir={run_dir}",
                   *(f"--config.{o.format(prompts=assets['prompts'])}" for o in overrides)])
    assert_one_error_line(out, names)
    assert not run_dir.exists()


def test_sample_names_a_missing_prompts_file(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    out = cli_run(["sample", "--model", str(tmp_path), "--prompts", missing, "--out", str(tmp_path / "o.jsonl")])
    assert_one_error_line(out, f"--prompts {missing}")
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------------ in process

def mesh_of(data, fsdp, model=1):
    return types.SimpleNamespace(axis_names=("data", "fsdp", "model"), axis_sizes=(data, fsdp, model))


def cfg_of(assets, task="sft", *overrides, **fields):
    files = assets["prompts"] if task in ("grpo", "ppo") else assets["sft"]
    return tiny_config(task, "", assets["tok"], files, assets["cache"], *overrides, **fields)


@pytest.mark.parametrize("task,overrides,mesh,error", [
    ("sft", ("train.batch_size=16",), (1, 8), None),
    ("sft", ("train.batch_size=12",), (1, 8), "train.batch_size 12 is not a multiple of the 8"),
    ("sft", ("train.batch_size=12",), (2, 2, 2), None),
    ("sft", ("train.batch_size=12",), (1, 1, 8), None),  # tensor parallelism alone: nothing to split
    ("sft", ("train.batch_size=16", "train.micro_batch_size=2"), (2, 4), "train.micro_batch_size 2"),
    ("dpo", ("train.batch_size=6",), (4, 1, 2), "use a multiple of 4"),
    ("grpo", ("train.batch_size=1", "grpo.num_generations=8"), (1, 8), None),
    ("grpo", ("train.batch_size=2", "grpo.num_generations=6"), (1, 8),
     "train.batch_size 2 x grpo.num_generations 6 = 12 rows is not a multiple of the 8"),
])
def test_batch_must_split_over_the_data_parallel_devices(assets, task, overrides, mesh, error):
    cfg = cfg_of(assets, task, *overrides)
    if error is None:
        preflight.check_batch_divides(cfg, get_task(task), mesh_of(*mesh))
    else:
        with pytest.raises(JaxalignError, match=error):
            preflight.check_batch_divides(cfg, get_task(task), mesh_of(*mesh))


@pytest.mark.parametrize("task,overrides,error", [
    ("sft", ("data.max_length=64",), None),
    ("sft", ("data.max_length=65",), "data.max_length 65 exceeds the 64 positions"),
    ("grpo", ("data.max_length=32", "grpo.max_completion_length=33"), None),  # prompts are cut to 31
    ("grpo", ("data.max_length=32", "grpo.max_completion_length=34"), "max_length - 1 = 31 tokens"),
    ("ppo", ("data.max_length=40", "data.max_prompt_length=16", "ppo.max_completion_length=48",
             "ppo.reward_funcs=tests.grpo_rewards:e_fraction"), None),
    ("ppo", ("data.max_length=40", "data.max_prompt_length=16", "ppo.max_completion_length=49",
             "ppo.reward_funcs=tests.grpo_rewards:e_fraction"), "data.max_prompt_length 16 \\+ ppo"),
])
def test_lengths_must_fit_the_positions(assets, task, overrides, error):
    cfg, task = cfg_of(assets, task, *overrides), get_task(task)
    model = get_preset("tiny").replace(max_position_embeddings=64)
    if error is None:
        preflight.check_lengths(cfg, task, model)
    else:
        with pytest.raises(JaxalignError, match=error):
            preflight.check_lengths(cfg, task, model)
    preflight.check_lengths(cfg, task, model.replace(max_position_embeddings=0))  # no limit: not checked


def test_warmup_and_host_memory_warnings(assets, monkeypatch):
    lines = []
    run_lib.build(cfg_of(assets, "sft", "optim.warmup_steps=4", "train.steps=4"), get_task("sft"), abstract=True,
                  log=lines.append)
    warnings = [x for x in lines if x.startswith("warning:")]
    assert len(warnings) == 1 and "optim.warmup_steps 4 >= train.steps 4" in warnings[0], lines
    lines.clear()
    monkeypatch.setattr(preflight, "host_memory_available", lambda: 1024)
    run_lib.build(cfg_of(assets, "sft", "optim.warmup_steps=3", "train.steps=4"), get_task("sft"), abstract=True,
                  log=lines.append)
    warnings = [x for x in lines if x.startswith("warning:")]
    assert len(warnings) == 1 and f"{jax.device_count()} CPU devices need about" in warnings[0], lines


def test_host_memory_is_read_from_meminfo():
    free = preflight.host_memory_available()
    assert free is None or free > 0


class XlaRuntimeError(RuntimeError):
    """The name older jaxlibs give XLA's runtime error."""


OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.\nBufferAssignment OOM Debugging."


@pytest.mark.parametrize("error,translated", [
    (jax.errors.JaxRuntimeError(OOM), True),
    (XlaRuntimeError("Out of memory allocating 12 bytes"), True),
    (jax.errors.JaxRuntimeError("INTERNAL: something else"), False),
    (RuntimeError(OOM), False),  # not XLA's
])
def test_device_oom_becomes_one_line(assets, error, translated):
    cfg = cfg_of(assets, "sft", "train.micro_batch_size=4")
    out = cli.out_of_memory(error, cfg)
    if not translated:
        assert out is None
        return
    assert isinstance(out, JaxalignError) and "\n" not in str(out)
    for field in ("train.micro_batch_size (now 4)", "data.max_length (now 32)", "model.remat=full", "mesh fsdp"):
        assert field in str(out)


def test_train_command_reports_a_device_oom_in_one_line(assets, tmp_path, monkeypatch, capsys):
    from jaxalign.train import loop

    def oom(*_, **__):
        raise jax.errors.JaxRuntimeError(OOM)
    monkeypatch.setattr(loop, "train", oom)
    monkeypatch.setattr(cli.xla_flags, "apply", lambda *a, **k: {})
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", assets["recipe"], f"--config.run_dir={tmp_path / 'run'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxalign: error: out of device memory (RESOURCE_EXHAUSTED")
