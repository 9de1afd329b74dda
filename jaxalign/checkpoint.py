"""Orbax persistence. For now: a params-only save/restore used by converted model directories
(`jaxalign convert --from-hf`); restoring onto any mesh by passing ShapeDtypeStructs with shardings."""
import os

import jax
import orbax.checkpoint as ocp

from jaxalign import JaxalignError


def save_params(path: str, params: dict):
    """Save a pure dict of (sharded) arrays; every process calls it. Orbax writes to a temporary
    directory and renames it when complete, so a crash leaves no half-written checkpoint."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), params)
    ckptr.wait_until_finished()
    ckptr.close()


def _keystr(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def check_tree(path: str, stored, target):
    """Every target array must be stored with the same shape; report the first that is not, by name."""
    stored = {_keystr(p): m for p, m in jax.tree.leaves_with_path(stored)}
    for p, t in jax.tree.leaves_with_path(target):
        name = _keystr(p)
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
