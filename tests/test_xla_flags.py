"""jaxalign/parallel/xla_flags.py: the per-platform flags, merged without overriding the user's, and every GPU
flag is one this jaxlib knows (XLA aborts at backend start on an unknown flag)."""
import os
import subprocess
import sys

import pytest

from jaxalign.parallel import xla_flags


def test_platform_flags_go_to_the_platforms_variable():
    gpu = {"JAX_PLATFORMS": "cuda"}
    changed = xla_flags.apply("recommended", environ=gpu)
    assert set(changed) == {"XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in gpu["XLA_FLAGS"].split()
    assert gpu["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
    tpu = {"JAX_PLATFORMS": "tpu"}
    xla_flags.apply("recommended", environ=tpu)
    assert "--xla_tpu_enable_async_collective_fusion=true" in tpu["LIBTPU_INIT_ARGS"].split() and "XLA_FLAGS" not in tpu
    for env in ({"JAX_PLATFORMS": "cpu"}, {"JAX_PLATFORMS": "cuda"}):
        mode = "none" if env["JAX_PLATFORMS"] == "cuda" else "recommended"
        assert xla_flags.apply(mode, environ=env) == {} and set(env) == {"JAX_PLATFORMS"}
    with pytest.raises(ValueError, match="runtime.xla_flags"):
        xla_flags.apply("fast", environ={})


def test_the_users_flags_win_and_extra_flags_are_appended():
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
    xla_flags.apply("recommended", "--xla_dump_to=/tmp/x", environ=env)
    flags = env["XLA_FLAGS"].split()
    assert flags[0] == "--xla_gpu_enable_latency_hiding_scheduler=false" and flags[-1] == "--xla_dump_to=/tmp/x"
    assert sum("latency_hiding" in f for f in flags) == 1 and len(flags) == len(xla_flags.GPU) + 1
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    again = dict(env)
    assert xla_flags.apply("recommended", environ=again) == {} and again == env  # idempotent


def _starts(flags: str) -> bool:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True).returncode == 0


def test_every_gpu_flag_is_known_to_this_jaxlib():
    assert _starts(xla_flags.merged("", xla_flags.GPU))
    assert not _starts("--xla_gpu_no_such_flag=true")  # the check can fail


def test_dry_run_targets_parse_and_say_what_they_need():
    from jaxalign import JaxalignError
    from jaxalign.parallel import targets
    assert targets.parse("h200") == ("h200", 1) and targets.parse("H100x8") == ("h100", 8)
    with pytest.raises(JaxalignError, match="dry_run_target='a100'"):
        targets.parse("a100")
    env = {"JAX_PLATFORMS": "tpu"}
    targets.prepare_env(env)
    assert env == {"JAX_PLATFORMS": "tpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:  # this environment: no CUDA plugin, so deviceless GPU compilation says what to install
        with pytest.raises(JaxalignError, match=r"jax\[cuda12\]"):
            targets.devices("h200")
