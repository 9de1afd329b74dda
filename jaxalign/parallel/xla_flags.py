"""Every XLA flag and allocator setting jaxalign chooses, in one place.

`apply()` runs before JAX starts its backend (the `jaxalign` command and `bench.run` call it first thing):
flags are read once, at backend start. A flag the user already set (in XLA_FLAGS / LIBTPU_INIT_ARGS or the
environment) keeps the user's value. The platform is read from JAX_PLATFORMS, else from which PJRT plugin is
installed (CUDA or libtpu); plain CPU runs get nothing (no XLA:CPU flag measured faster on the CPU benchmark).
Config: `runtime.xla_flags` = "recommended" (these) | "none"; `runtime.extra_xla_flags` is appended as is;
`runtime.memory_fraction` is the GPU allocator's share (also what `--dry-run` checks a step against).
"""
import importlib.util
import os
import shlex

# GPU (XLA_FLAGS): the overlap flags NVIDIA's JAX-Toolbox and MaxText use for FSDP / data-parallel training.
GPU = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",   # schedule collectives to overlap with compute
    "xla_gpu_enable_while_loop_double_buffering": "true",  # prefetch the next scanned layer's weights
    "xla_gpu_enable_pipelined_all_gather": "true",       # FSDP: gather layer i+1 while layer i computes
    "xla_gpu_enable_pipelined_reduce_scatter": "true",   # ... and scatter layer i's gradients after it
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_all_gather_combine_threshold_bytes": str(1 << 27),  # fewer, larger collectives
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(1 << 27),
    "xla_gpu_all_reduce_combine_threshold_bytes": str(1 << 27),
}
# GPU: the share of device memory XLA's allocator takes (JAX's default 0.75 leaves 35 GB of an H200 unused).
MEMORY_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"

# TPU (LIBTPU_INIT_ARGS): asynchronous collective fusion, overlapping FSDP all-gathers with compute (MaxText's).
TPU = {
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
    "xla_tpu_overlap_compute_collective_tc": "true",
    "xla_enable_async_all_gather": "true",
}

MODES = ("recommended", "none")


def detect_platform(environ=os.environ) -> str:
    """cpu | gpu | tpu, decided without starting a JAX backend."""
    requested = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if requested:
        return {"cuda": "gpu", "rocm": "gpu"}.get(requested, requested)
    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return "gpu"
    if importlib.util.find_spec("libtpu"):
        return "tpu"
    return "cpu"


def merged(existing: str, flags: dict, extra: str = "") -> str:
    """`existing` flags, then each of ours whose name it does not already set, then `extra`."""
    have = {f.lstrip("-").split("=", 1)[0] for f in shlex.split(existing)}
    ours = [f"--{k}={v}" for k, v in flags.items() if k not in have]
    return " ".join(p for p in [existing.strip(), *ours, extra.strip()] if p)


def backend_started() -> bool:
    from jax._src import xla_bridge
    return bool(getattr(xla_bridge, "_backends", None))


def apply(mode: str = "recommended", extra: str = "", memory_fraction: float = 0.9, platform=None,
          environ=os.environ) -> dict:
    """Set the flags for `platform` (default: this machine's); returns {variable: new value} for what changed."""
    if mode not in MODES:
        raise ValueError(f"runtime.xla_flags={mode!r}: expected one of {MODES}")
    kind = platform or detect_platform(environ)
    flags = {} if mode == "none" else {"gpu": GPU, "tpu": TPU}.get(kind, {})
    env = {} if mode == "none" or kind != "gpu" else {MEMORY_FRACTION: f"{memory_fraction:g}"}
    var = "LIBTPU_INIT_ARGS" if kind == "tpu" else "XLA_FLAGS"
    changed = {}
    if flags or extra:
        if environ is os.environ and backend_started():
            raise RuntimeError("XLA flags must be set before JAX starts its backend (call xla_flags.apply first)")
        value = merged(environ.get(var, ""), flags, extra)
        if value != environ.get(var, ""):
            environ[var] = changed[var] = value
    for k, v in env.items():
        if k not in environ:
            environ[k] = changed[k] = v
    return changed
