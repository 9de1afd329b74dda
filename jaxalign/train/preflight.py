"""Pre-flight checks of a run that need the mesh or the model config but no data and no weights: the
directories a config names exist, every batch splits over the data-parallel devices, the lengths fit the
model's positions; and a warning when simulated CPU devices would need more host memory than is free.
`run.build` and `run.preflight` call them (load_config has already run the checks that need neither).
"""
import math
import os
from typing import Optional

from jaxalign import JaxalignError
from jaxalign.train import memory


def check_sources(cfg):
    """The directories a config names exist (else the tokenizer, read first, would be the one reported)."""
    for field, path, what in (("init_from", cfg.init_from, "model"), ("model.path", cfg.model.path, "model"),
                              ("lora.init_from", cfg.lora.init_from, "adapter"),
                              ("tokenizer.path", cfg.tokenizer.path, "tokenizer")):
        if path and not os.path.isdir(path):
            raise JaxalignError(f"{field}: {path}: {what} directory not found")


def check_batch_divides(cfg, task, mesh):
    """Every batch the step sees splits evenly over the data-parallel devices (data x fsdp). A batch dimension
    the mesh does not divide is not an error to JAX: mesh.logical_to_spec drops the axis and every device
    computes the same rows. GRPO's rows are its prompts times grpo.num_generations; micro-batches are split
    from the batch (step.split_micro) and sharded over the same devices."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    dp = sizes["data"] * sizes["fsdp"]
    G = task.section(cfg).get("num_generations", 1)
    for field in ("batch_size", "micro_batch_size"):
        n = cfg.train[field]
        if not n or (n * G) % dp == 0:
            continue
        rows = f" x {task.name}.num_generations {G} = {n * G} rows" if G > 1 else ""
        raise JaxalignError(f"train.{field} {n}{rows} is not a multiple of the {dp} data-parallel devices "
                            f"(mesh data {sizes['data']} x fsdp {sizes['fsdp']}): every device would compute "
                            f"the whole batch; use a multiple of {dp // math.gcd(G, dp)} or another mesh.shape")


def check_lengths(cfg, task, model_cfg):
    """data.max_length, and for tasks that sample (a section with max_completion_length) the longest prompt
    plus its completion, fit the model's positions (a model without a limit is not checked)."""
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if not limit:
        return
    model = cfg.init_from or cfg.model.path or f"model.preset {cfg.model.preset}"
    where = f"the {limit} positions of {model} (max_position_embeddings)"
    L = cfg.data.max_length
    if L > limit:
        raise JaxalignError(f"data.max_length {L} exceeds {where}: lower data.max_length")
    N = task.section(cfg).get("max_completion_length")
    if N is None:
        return
    P = cfg.data.max_prompt_length
    prompt = f"data.max_prompt_length {P}" if P else f"prompts of up to data.max_length - 1 = {L - 1} tokens"
    if (P or L - 1) + N > limit:
        raise JaxalignError(f"{prompt} + {task.name}.max_completion_length {N} = {(P or L - 1) + N} exceeds "
                            f"{where}: lower them (or set data.max_prompt_length)")


def host_memory_available() -> Optional[int]:
    """Bytes of host memory free for new allocations (/proc/meminfo MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def warn_host_memory(cfg, task, model_cfg, mesh, log):
    """On CPU the simulated devices share the host's memory: warn when the dry run's estimate for all of them
    exceeds what is free (swapping or the OOM killer would follow; not an error, the estimate is rough)."""
    devices = mesh.devices.flat
    if getattr(devices[0], "platform", None) != "cpu":
        return
    n = mesh.devices.size
    per = memory.estimate(cfg, model_cfg, n, task)["total"]
    free = host_memory_available()
    if free and per * n > free:
        gib = lambda b: f"{b / 2**30:.1f} GiB"
        log(f"warning: {n} CPU devices need about {gib(per * n)} ({gib(per)} each, estimated) but the host "
                f"has {gib(free)} free; expect swapping or the OOM killer")
