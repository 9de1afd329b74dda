"""Trainers: one generic loop (loop.py) and one small file per task."""


def get_task(name: str):
    from jaxalign import JaxalignError
    if name == "sft":
        from jaxalign.train.sft import TASK
        return TASK
    raise JaxalignError(f"task {name!r} is not implemented yet (available: sft)")
