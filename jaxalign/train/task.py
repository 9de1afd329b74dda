"""What a task is: one declaration per algorithm, registered once.

A task file (sft.py, reward.py, preference.py, grpo.py, ppo.py) builds a `Task` and calls `register`. The
declaration is all the rest of jaxalign knows about it: its config section and defaults (the config skeleton
is built from the registry, so `--config.<task>.<field>` exists exactly when the task declares it), the check
`load_config` runs before anything is read, the record kind its data uses, its loss, the memory figures
`--dry-run` prints, and the hooks the loop calls.

Hook arguments, the same for every task:
- device side (inside the jitted step): `loss(model, batch, rng, cfg, aux)` and `pre_step(model, batch, rng,
  cfg, aux)`; `model` is the merged NNX model (a dict by name for multi-model tasks), `batch` holds arrays.
- host side: `hook(run, ...)`, where `run` is the `train.run.Run` that `build()` made (mesh, rules,
  tokenizer, datasets, model config, graphdefs, the LoRA base, log).
"""
import dataclasses
from typing import Callable, Optional



@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device memory figures of a task (train/memory.py turns them into bytes)."""
    sequences_per_row: Callable = lambda cfg: 1   # forward rows per batch row: 2 for pairs, G for GRPO
    trained_models: int = 1                       # models with gradients and optimizer state (PPO: 2)
    reference: Callable = lambda cfg: False       # holds a frozen copy of the policy as its reference
    frozen_models: int = 0                        # further frozen models of the policy's size (PPO: reward model)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    data_kind: str                         # the record kind of its data (data.kinds)
    # loss(model, batch, rng, cfg, aux) -> (loss_sum, denominator, {name: (sum, count)})
    loss: Callable
    defaults: Optional[dict] = None        # its config section cfg.<name> (None: no section)
    check: Optional[Callable] = None       # check(cfg): raise JaxalignError on a bad field; run by load_config
    memory: Memory = Memory()
    batch_keys: Optional[tuple] = None     # host-batch keys the step takes (default: every array)
    # model_config(run) -> the model config the task trains (e.g. with a scalar head)
    model_config: Optional[Callable] = None
    # host_batch(run, host) -> host: on the host, before a batch goes to the devices (train and eval)
    host_batch: Optional[Callable] = None
    # setup(run) -> aux: frozen arrays every step receives (e.g. reference params); it may attach per-example
    # columns to the datasets (precomputed values) instead and return None.
    setup: Optional[Callable] = None
    # pre_step(model, batch, rng, cfg, aux) -> {name: [B, ...]}: values over the whole global batch (e.g. KTO's
    # KL reference point), without gradient, added to the batch before it is split into micro-batches.
    pre_step: Optional[Callable] = None
    # finish(run, params) -> model config: once after the last step, before the export (e.g. reward statistics)
    finish: Optional[Callable] = None
    # rollout(run) -> an online-RL rollout (train/rl.py): called with (prompt iterator, params, step) it returns
    # (host batch, host metrics); evaluate(params, data) replaces the loss-based eval; state()/restore(d) carry
    # its own state through checkpoints.
    rollout: Optional[Callable] = None
    # models(run) -> {name: (model config, source)} for tasks that train several models (PPO: actor, critic);
    # params and graphdefs are then dicts by name, the first model is the policy.
    models: Optional[Callable] = None
    # optimizer(run, params_abstract) -> (tx, lr_fn) replacing the single AdamW (e.g. one per model)
    optimizer: Optional[Callable] = None

    def section(self, cfg):
        """The task's own config section (an empty dict when it has none)."""
        return cfg[self.name] if self.defaults is not None else {}


TASKS: dict = {}  # filled by register(); train/registry.py imports every task file


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task
