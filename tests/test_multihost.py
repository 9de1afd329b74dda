"""Multi-host rehearsal on CPU (DESIGN §7): `launch/local_multiprocess.sh` starts 2 processes x 4 simulated
devices joined with gloo; their runs must give the per-step losses of one process x 8 devices (this test
process), checkpoints written by two processes must resume in one and the reverse, and a coordinator
that never answers must fail within the timeout with a one-line error."""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxalign.train.registry import get_task
from jaxalign.train.loop import read_metrics, train
from tests.tokenizers_util import make_tokenizer, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")
CONFIG = '''
import ml_collections
from jaxalign.config import base_config
def get_config():
    c = base_config()
    c.update_from_flattened_dict({fields!r})
    return c
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("mh-assets")
    words = ["Hello there", "Name a color.", "Yes?", "Sort the list 3 1 2", "What is two plus two?", "Thanks!",
             "The quick brown fox", "Maybe."]
    sft = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": v}]}
           for w in words for v in ("Yes.", "No.")]
    pairs = [{"prompt": w, "chosen": "Yes.", "rejected": "No."} for w in words * 2]
    prompts = [{"prompt": w} for w in words * 2]
    unpaired = [{"prompt": w, "completion": v, "label": v == "Yes."} for w in words for v in ("Yes.", "No.")]
    out = {"tokenizer": make_tokenizer(str(d / "tok")), "sft": write_jsonl(d / "sft.jsonl", sft),
           "pairs": write_jsonl(d / "pairs.jsonl", pairs), "prompts": write_jsonl(d / "prompts.jsonl", prompts),
           "unpaired": write_jsonl(d / "unpaired.jsonl", unpaired), "cache": str(d / "cache"), "dir": d}
    rm = fields(out, d / "rm", "rm", **{"train.steps": 2, "checkpoint.every": 0})
    one_process(rm, "rm")  # the reward model PPO needs
    out["rm"] = str(d / "rm")
    return out


def fields(assets, run_dir, task="sft", **extra):
    data = {"sft": "sft", "dpo": "pairs", "rm": "pairs", "kto": "unpaired", "grpo": "prompts", "ppo": "prompts"}[task]
    f = {"task": task, "run_dir": str(run_dir), "model.preset": "tiny", "model.dtype": "float32",
         "tokenizer.path": assets["tokenizer"], "data.train_files": assets[data],
         "data.max_length": 32, "data.cache_dir": assets["cache"], "optim.lr": 3e-3, "optim.schedule": "constant",
         "train.steps": 4, "train.batch_size": 8, "train.log_every": 1, "train.progress": False,
         "checkpoint.every": 2, "checkpoint.async_save": False, "distributed.timeout_s": 60}
    f.update(extra)
    return f


def config_file(assets, name, f):
    path = assets["dir"] / f"{name}.py"
    path.write_text(CONFIG.format(fields=f))
    return str(path)


def launch(assets, name, f, n=2, devices=4, timeout=240):
    """Run `jaxalign train` in n processes; returns (returncode, output)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAXALIGN_TEST_CACHE", str(assets["dir"] / "jaxcache"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [LAUNCH, str(n), str(devices), sys.executable, "-m", "jaxalign.cli", "train", "--config",
           config_file(assets, name, f)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def one_process(f, task="sft"):
    from jaxalign.config import base_config
    c = base_config()
    c.update_from_flattened_dict(f)
    return train(c, get_task(task), log=lambda *a: None)


def losses(run_dir):
    return [m["loss"] for m in read_metrics(str(run_dir)) if "loss" in m]


GRPO = {"grpo.reward_funcs": "tests.grpo_rewards:e_fraction", "grpo.num_generations": 4,
        "grpo.max_completion_length": 6}


@pytest.mark.parametrize("task", ["sft", "dpo", "kto", "grpo", "ppo"])
def test_two_processes_match_one(assets, tmp_path, task):
    """KTO: its KL reference point spans both processes' rows. GRPO and PPO: each process samples its own
    prompts' completions on the shared mesh; rollouts, rewards and losses equal those of one process."""
    extra = {"grpo": GRPO, "ppo": {"ppo.reward_model": assets["rm"], "ppo.max_completion_length": 6}}.get(task, {})
    rc, out = launch(assets, f"two-{task}", fields(assets, tmp_path / "two", task, **extra))
    assert rc == 0, out[-3000:]
    assert "[0] distributed: 2 processes, 8 devices (4 per process)" in out
    assert "[1] done" not in out and "[0] done: step 4" in out  # process 0 alone reports
    one_process(fields(assets, tmp_path / "one", task, **extra), task)
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), atol=1e-5, rtol=0)
    if task in ("grpo", "ppo"):
        rewards = lambda d: [m["reward"] for m in read_metrics(str(d)) if "reward" in m]
        np.testing.assert_allclose(rewards(tmp_path / "two"), rewards(tmp_path / "one"), atol=1e-6)
    assert len(losses(tmp_path / "two")) == 4


def test_checkpoints_cross_process_counts(assets, tmp_path):
    whole = tmp_path / "whole"
    one_process(fields(assets, whole, **{"train.steps": 6}))
    # written by two processes, resumed by one
    a = tmp_path / "a"
    rc, out = launch(assets, "ckpt-a", fields(assets, a, **{"train.steps": 2}))
    assert rc == 0, out[-3000:]
    one_process(fields(assets, a, **{"train.steps": 4}))
    # ...and written by one, resumed by two
    rc, out = launch(assets, "ckpt-b", fields(assets, a, **{"train.steps": 6}))
    assert rc == 0, out[-3000:]
    assert "[0] resuming from step 4" in out
    np.testing.assert_allclose(losses(a), losses(whole), atol=1e-5, rtol=0)


def test_bad_coordinator_fails_in_bounded_time(assets, tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = fields(assets, tmp_path / "bad", **{"distributed.coordinator_address": f"127.0.0.1:{port}",
                                            "distributed.num_processes": 2, "distributed.process_id": 1,
                                            "distributed.timeout_s": 5})
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    start = time.time()
    p = subprocess.run([sys.executable, "-m", "jaxalign.cli", "train", "--config", config_file(assets, "bad", f)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert time.time() - start < 60
    assert p.returncode == 2, p.stderr[-2000:]
    assert "jaxalign: error: distributed: could not join the job at 127.0.0.1" in p.stderr


# ------------------------------------------------------------------------- settings and the dry run

def test_settings_precedence(monkeypatch):
    from jaxalign import JaxalignError
    from jaxalign.parallel import multihost
    for k in multihost.ENV + multihost.CLUSTER_HINTS:
        monkeypatch.delenv(k, raising=False)
    section = {"coordinator_address": "", "num_processes": 0, "process_id": -1}
    assert multihost.settings(section) == {} and not multihost.cluster_detected()
    monkeypatch.setenv("JAXALIGN_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAXALIGN_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXALIGN_PROCESS_ID", "3")
    assert multihost.settings(section) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                           "process_id": 3}
    explicit = {"coordinator_address": "h0:99", "num_processes": 2, "process_id": 0}
    assert multihost.settings(explicit) == explicit  # the config wins over the environment
    monkeypatch.delenv("JAXALIGN_PROCESS_ID")
    with pytest.raises(JaxalignError, match="without num_processes and process_id"):
        multihost.settings(section)
    monkeypatch.delenv("JAXALIGN_COORDINATOR_ADDRESS")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not multihost.cluster_detected()  # a one-task allocation is a single process
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert multihost.cluster_detected()


def test_dry_run_prints_arithmetic_and_compiles(assets, tmp_path, capsys):
    from jaxalign import cli
    f = fields(assets, tmp_path / "never", **{"train.micro_batch_size": 4, "mesh.shape": (2, 2, 2)})
    cli.main(["train", "--config", config_file(assets, "dry", f), "--dry-run"])
    out = capsys.readouterr().out
    assert "mesh {'data': 2, 'fsdp': 2, 'model': 2}" in out and "activations" in out
    assert "compiled train step, XLA's memory analysis per device" in out
    assert not (tmp_path / "never").exists()  # a dry run writes no run directory
    # Checked against a device size: the compiled step's needs (arguments + outputs - donated + temporaries).
    for gb, verdict in (("100", "fits"), ("0.0001", "DOES NOT FIT")):
        cli.main(["train", "--config", config_file(assets, "dry", f), "--dry-run",
                  f"--config.runtime.device_memory_gib={gb}"])
        out = capsys.readouterr().out
        assert re.search(r"the step needs [0-9.]+ GiB per device .* of [0-9.]+ GiB: " + verdict, out), out


def test_recipe_arithmetic_fits_the_hardware_it_names():
    """The numbers written in the large recipes are what jaxalign/train/memory.py computes."""
    from jaxalign.config import load_config
    from jaxalign.models.presets import get_preset
    from jaxalign.train.memory import estimate
    GiB = 2 ** 30
    sft = load_config(os.path.join(ROOT, "configs", "llama3_8b_sft.py"))
    e = estimate(sft, get_preset("llama3_8b", dtype="bfloat16", param_dtype="float32", remat="dots"), 16, get_task("sft"))
    assert e["num_params"] == 8_030_261_248 and round(e["params"] / GiB, 1) == 1.9
    assert 21 * GiB < e["total"] < 23 * GiB < 80 * GiB
    dpo70 = load_config(os.path.join(ROOT, "configs", "llama3_70b_dpo.py"))
    e = estimate(dpo70, get_preset("llama3_70b", dtype="bfloat16", param_dtype="float32", remat="full"), 64, get_task("dpo"))
    assert round(e["reference"] / GiB, 1) == 4.1 and 25 * GiB < e["total"] < 27 * GiB < 95 * GiB
    from jaxalign import lora
    llama8b = get_preset("llama3_8b", dtype="bfloat16", param_dtype="float32", remat="full")
    for base_dtype, base, total in (("bfloat16", 14.96, 18.1), ("int8", 8.46, 11.6)):
        cfg = load_config(os.path.join(ROOT, "configs", "llama3_8b_dpo_lora.py"), [f"lora.base_dtype={base_dtype}"])
        e = estimate(cfg, lora.adapted_config(llama8b, lora.spec(cfg)), 1, get_task("dpo"))
        assert round(e["base"] / GiB, 2) == base and round(e["total"] / GiB, 1) == total and e["reference"] == 0


def test_orbax_checkpoint_barriers_go_through_the_coordinator():
    """Multi-process runs switch Orbax's barriers from a gloo collective (a 30 s rendezvous that a straggling
    process on a cold compile cache misses) to the coordination service's barrier (timeout 300 s)."""
    from orbax.checkpoint._src.multihost import multihost as orbax_multihost

    from jaxalign.parallel import multihost
    multihost._orbax_barriers_through_the_coordinator()
    assert orbax_multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.value is True
