"""Orbax persistence. For now: a params-only save/restore used by converted model directories
(`jaxalign convert --from-hf`); restoring onto any mesh by passing ShapeDtypeStructs with shardings."""
import os

import orbax.checkpoint as ocp


def save_params(path: str, params: dict):
    """Save a pure dict of (sharded) arrays; every process calls it. Orbax writes to a temporary
    directory and renames it when complete, so a crash leaves no half-written checkpoint."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), params)
    ckptr.wait_until_finished()
    ckptr.close()


def restore_params(path: str, target: dict) -> dict:
    """Restore into `target` (pure dict of ShapeDtypeStructs carrying the wanted shardings and dtypes)."""
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(os.path.abspath(path), target)
    finally:
        ckptr.close()
