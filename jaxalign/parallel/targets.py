"""Compile for a GPU this machine does not have: `jaxalign train --dry-run --config.runtime.dry_run_target=h200`.

XLA compiles deviceless from a description of the target GPU (jax.experimental.topologies with a
`target_config`), so the dry run's memory analysis is the GPU compiler's own (its fusions, bf16 matmuls, cuDNN
attention) rather than XLA:CPU's. It needs the CUDA plugin installed (`pip install "jax[cuda12]"`), not a GPU;
`prepare_env` must run before JAX starts its backend (the CLI does it). A target is a name, optionally times a
device count on one host: "h200", "h100x8".
"""
import os
import re

from jaxalign import JaxalignError

# GpuTargetConfig (xla/stream_executor/device_description.proto) of each card: what the compiler asks the
# device when it has one. device_memory_size is the usable HBM the driver reports; cuDNN 9.28 and CUDA 12.9 are
# the versions jax[cuda12]==0.10.2 installs (and the ones this was checked with).
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 28 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{name}"
"""
MEMORY = {"h200": 150_754_820_096, "h100": 84_929_347_584}  # bytes the driver reports ("141 GB", "80 GB")
TARGETS = {  # name: (target config, device memory in bytes)
    "h200": (_HOPPER.format(bandwidth=4_800_000_000_000, memory=MEMORY["h200"], name="NVIDIA H200"), MEMORY["h200"]),
    "h100": (_HOPPER.format(bandwidth=3_352_320_000_000, memory=MEMORY["h100"], name="NVIDIA H100 80GB HBM3"),
             MEMORY["h100"]),
}


def parse(target: str):
    """"h200x8" -> ("h200", 8)."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:x(\d+))?", target.strip().lower())
    if not m or m.group(1) not in TARGETS:
        raise JaxalignError(f"runtime.dry_run_target={target!r}: expected one of {sorted(TARGETS)}, optionally "
                            f"x<devices> (e.g. h200x8)")
    return m.group(1), int(m.group(2) or 1)


def prepare_env(environ=os.environ):
    """Before the backend starts: JAX on CPU (no GPU driver is needed, none is started) and the CUDA plugin
    allowed to load without one."""
    environ.setdefault("JAX_PLATFORMS", "cpu")
    environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"


def devices(target: str) -> tuple:
    """(the target's abstract devices for a Mesh, its memory in bytes)."""
    name, count = parse(target)
    from jax.experimental import topologies
    config, memory = TARGETS[name]
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x1x{count}")
    except Exception as e:  # noqa: BLE001 (the plugin's absence surfaces as several exception types)
        raise JaxalignError(f"compiling for {target} needs the CUDA plugin (pip install \"jax[cuda12]\"; no GPU "
                            f"is needed): {type(e).__name__}: {e}") from None
    return list(topo.devices), memory
