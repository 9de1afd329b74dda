"""Trainers: one generic loop (loop.py) and one small file per task."""

TASKS = {"sft": ("jaxalign.train.sft", "TASK"), "rm": ("jaxalign.train.reward", "TASK"),
         "dpo": ("jaxalign.train.preference", "DPO"), "simpo": ("jaxalign.train.preference", "SIMPO"),
         "cpo": ("jaxalign.train.preference", "CPO"), "orpo": ("jaxalign.train.preference", "ORPO"),
         "kto": ("jaxalign.train.preference", "KTO"), "grpo": ("jaxalign.train.grpo", "TASK"),
         "ppo": ("jaxalign.train.ppo", "TASK")}


def get_task(name: str):
    import importlib

    from jaxalign import JaxalignError
    if name not in TASKS:
        raise JaxalignError(f"task {name!r} is not implemented yet (available: {', '.join(TASKS)})")
    module, attr = TASKS[name]
    return getattr(importlib.import_module(module), attr)
