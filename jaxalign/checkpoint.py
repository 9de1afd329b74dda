"""Orbax persistence. For now: a params-only save/restore used by converted model directories
(`jaxalign convert --from-hf`); restoring onto any mesh by passing ShapeDtypeStructs with shardings."""
import contextlib
import logging
import os

import jax
import orbax.checkpoint as ocp

from jaxalign import JaxalignError
from jaxalign.tree import keystr


def save_params(path: str, params: dict):
    """Save a pure dict of (sharded) arrays; every process calls it. Orbax writes to a temporary
    directory and renames it when complete, so a crash leaves no half-written checkpoint."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), params)
    ckptr.wait_until_finished()
    ckptr.close()


def check_tree(path: str, stored, target):
    """Every target array must be stored with the same shape; report the first that is not, by name."""
    stored = {keystr(p): m for p, m in jax.tree.leaves_with_path(stored)}
    for p, t in jax.tree.leaves_with_path(target):
        name = keystr(p)
        if name not in stored:
            raise JaxalignError(f"{path}: parameter {name!r} is missing")
        if tuple(stored[name].shape) != tuple(t.shape):
            raise JaxalignError(f"{path}: parameter {name!r} has shape {list(stored[name].shape)}, "
                                f"the config implies {list(t.shape)}")


def restore_params(path: str, target: dict) -> dict:
    """Restore into `target` (pure dict of ShapeDtypeStructs carrying the wanted shardings and dtypes),
    after checking names and shapes against the checkpoint's metadata."""
    path = os.path.abspath(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        try:
            stored = ckptr.metadata(path).item_metadata
        except Exception as e:
            raise JaxalignError(f"{path}: not a readable Orbax checkpoint ({e})") from None
        check_tree(path, stored, target)
        return ckptr.restore(path, target)
    finally:
        ckptr.close()


class RunCheckpoints:
    """Orbax CheckpointManager over `run_dir/checkpoints/<step>/`: the train state (params, optimizer
    state, step, rng) and a JSON item (data-iterator position and anything else a resume needs).
    Saves are asynchronous; Orbax commits each step atomically, so a kill loses only unsaved steps."""

    def __init__(self, run_dir: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data: dict):
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data)), force=True)

    def restore(self, step: int, target):
        """(state, data) of `step`; `target` holds ShapeDtypeStructs with the wanted shardings."""
        check_tree(f"{self.directory}/{step}", self.manager.item_metadata(step)["state"], target)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


class _DropMissingMetadata(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith("Metadata file does not exist")


@contextlib.contextmanager
def _no_step_metadata_warning():
    """Checkpointer.metadata on a manager step's `state/` item looks for a step metadata file there (the
    manager keeps it one level up) and logs an absl WARNING "Metadata file does not exist: ..." on every load
    of a run directory; drop exactly that message for the call, nothing else."""
    logger, drop = logging.getLogger("absl"), _DropMissingMetadata()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def latest_run_step(run_dir: str):
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return None
    steps = [int(n) for n in os.listdir(d) if n.isdigit()
             and os.path.isdir(os.path.join(d, n, "state"))]
    return max(steps) if steps else None


def restore_run_params(run_dir: str, target: dict, step=None) -> dict:
    """Params alone from a run's latest (or given) checkpoint, onto `target`'s shardings. A run that trained
    several models (PPO's actor and critic) yields its policy, stored under "actor"."""
    step = latest_run_step(run_dir) if step is None else step
    if step is None:
        raise JaxalignError(f"{run_dir}: no checkpoints")
    path = os.path.join(os.path.abspath(run_dir), "checkpoints", str(step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    try:
        with _no_step_metadata_warning():
            stored = ckptr.metadata(path).item_metadata["params"]
        nested = "actor" in stored and "actor" not in target
        if nested:
            stored, target = {"actor": stored["actor"]}, {"actor": target}
        check_tree(path, {"params": stored}, {"params": target})
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)
        out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item={"params": target},
                                                              restore_args={"params": restore_args},
                                                              partial_restore=True))
        return out["params"]["actor"] if nested else out["params"]
    finally:
        ckptr.close()
