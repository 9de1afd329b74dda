"""Every task, registered by importing its file (adding an algorithm: one file, plus its line here)."""
from jaxalign import JaxalignError
from jaxalign.train import grpo, ppo, preference, reward, sft  # noqa: F401  (each registers its tasks)
from jaxalign.train.task import TASKS, Task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise JaxalignError(f"task {name!r} is not implemented (available: {', '.join(TASKS)})")
    return TASKS[name]
