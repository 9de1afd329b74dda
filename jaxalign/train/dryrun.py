"""`jaxalign train --dry-run`: the per-device memory arithmetic of a config, then (when this machine has the
mesh's devices, real or simulated with XLA_FLAGS=--xla_force_host_platform_device_count=N) the train step
compiled on abstract parameters, optimizer state and batch, with XLA's own memory analysis and whether the step
fits the device (runtime.device_memory_gib, else the device's own limit). runtime.dry_run_target=h200 compiles
for that GPU deviceless (jaxalign/parallel/targets.py). Nothing is allocated and no run directory is written."""
import jax

from jaxalign.parallel import mesh as mesh_lib
from jaxalign.parallel import targets
from jaxalign.train import memory
from jaxalign.train import state as state_lib
from jaxalign.train.hooks import task_batch
from jaxalign.train.run import build, split_base_reference
from jaxalign.train.step import make_train_step


def dry_run(cfg, task, log=print, devices=None) -> dict:
    """`devices`: the mesh's devices (default: all of this process's view, or runtime.dry_run_target's)."""
    target_memory = 0
    if cfg.runtime.dry_run_target:
        devices, target_memory = targets.devices(cfg.runtime.dry_run_target)
    run = build(cfg, task, abstract=True, log=log, devices=devices)
    est = memory.estimate(cfg, run.model_cfg, len(devices) if devices is not None else jax.device_count(), task)
    log(memory.report(est))
    out = {"estimate": est}
    if run.mesh is None:
        log(f"compile skipped: mesh.shape {tuple(cfg.mesh.shape)} needs more devices than the "
            f"{len(devices) if devices is not None else jax.device_count()} here (simulate them on CPU with "
            f"JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        return out
    if task.rollout or task.models:
        log(f"compile skipped: the dry run compiles offline tasks' train steps only, not {task.name}'s rollouts")
        return out
    if task.setup and task.section(cfg).get("precompute_ref_logps"):
        log("compile skipped: precomputed reference log-probs need the reference pass (set "
            f"{task.name}.precompute_ref_logps=false to compile the on-the-fly variant)")
        return out
    mesh, rules = run.mesh, run.rules
    host = next(run.train_batches())
    if task.host_batch is not None:
        host = task.host_batch(run, host)
    state = state_lib.abstract_state(run.tx, run.params_abs, run.shardings)
    frozen = run.frozen  # with LoRA: the frozen base as it will be stored (abstract)
    ref = frozen if frozen is not None else mesh_lib.abstract_with_shardings(run.params_abs,
                                                                             run.shardings["params"])
    ref_is_base, aux = split_base_reference({"ref": ref} if task.setup else None, frozen)
    step = jax.jit(make_train_step(task, run.graphdef, run.tx, run.lr_fn, cfg, run.n_micro, run.compose,
                                   cfg.lora.dropout if run.lora_spec else 0.0, ref_is_base),
                   out_shardings=(run.shardings, None), donate_argnums=0)
    with jax.set_mesh(mesh):
        compiled = step.lower(state, mesh_lib.abstract_batch(task_batch(host, task), mesh, rules), aux,
                              frozen).compile()
    m = compiled.memory_analysis()
    if m is None:
        log("compiled train step (this backend reports no memory analysis)")
        return out
    xla = {k: getattr(m, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["xla"] = xla
    log("compiled train step, XLA's memory analysis per device: " + ", ".join(
        f"{k} {v / 2**20:.1f} MiB" for k, v in xla.items()))
    out["needed"] = needed(xla)
    out["device_memory"] = device_memory(cfg, target_memory)
    platform = mesh.devices.flat[0].platform
    if out["device_memory"]:
        fits = out["needed"] <= out["device_memory"]
        log(f"the step needs {out['needed'] / 2**30:.2f} GiB per device (arguments + outputs - donated + "
            f"temporaries) of {out['device_memory'] / 2**30:.2f} GiB: {'fits' if fits else 'DOES NOT FIT'}"
            + ("" if platform != "cpu" else " (compiled by XLA:CPU, which converts bf16 matmuls to f32 and fuses "
               "differently: set runtime.dry_run_target=h200 to compile for the GPU itself)"))
    return out


def needed(xla: dict) -> int:
    """Peak bytes of the compiled step: live arguments and outputs (donated outputs reuse their arguments'
    buffers) plus XLA's temporaries."""
    return xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]


def device_memory(cfg, target_memory: float = 0) -> int:
    """runtime.device_memory_gib, else the dry-run target's memory, times the allocator's share; else what the
    device reports (bytes_limit: already the allocator's share); else 0 (unknown: CPU)."""
    total = cfg.runtime.device_memory_gib * 2**30 or target_memory
    if total:
        return int(total * cfg.runtime.memory_fraction)
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", 0))
