"""Device mesh (data, fsdp, model), logical-axis rules, sharded placement of params and batches.

Model code names only logical axes (`vocab`, `embed`, `heads`, ...); a rule table maps them to mesh axes.
A mesh axis that does not divide a dimension is dropped for that array (it stays replicated on that
axis) rather than failing: e.g. 2 kv heads on a model axis of 4.
"""
import contextlib
import contextvars
import math
from typing import Iterable, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxalign import JaxalignError

MESH_AXES = ("data", "fsdp", "model")


class MeshError(JaxalignError, ValueError):
    """A mesh shape that does not fit the devices (a user error: one line from the CLI)."""

# (logical axis, mesh axis | tuple of mesh axes | None). FSDP shards the embed dim of every weight, tensor
# parallelism ("model") shards heads, mlp and vocab; activations shard their batch over data x fsdp.
DEFAULT_RULES = (
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("layers", None),
    ("positions", None),
    ("labels", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_vocab", "model"),
)

_RULES = contextvars.ContextVar("jaxalign_logical_rules", default=DEFAULT_RULES)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence] = None) -> Mesh:
    """Mesh over `devices` (default: all) with axes (data, fsdp, model); one -1 entry takes the rest."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh.shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise MeshError(f"mesh.shape {shape}: at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise MeshError(f"mesh.shape {shape}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise MeshError(f"mesh.shape {shape} needs {math.prod(shape)} devices, {len(devices)} available")
    device_grid = np.asarray(devices).reshape(shape)
    if len(devices) == len(jax.devices()):
        # Let JAX order devices for the physical topology (ICI rings on TPU, NVLink islands on GPU).
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def normalize_rules(rules) -> tuple:
    """Rules from a config (lists from JSON/ml_collections) as a tuple of (name, axis-or-tuple-or-None)."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


@contextlib.contextmanager
def use_rules(rules):
    token = _RULES.set(normalize_rules(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> tuple:
    return _RULES.get()


def _axis_sizes(mesh) -> dict:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_to_spec(axes: Iterable, shape: Optional[Sequence[int]] = None, mesh=None, rules=None) -> P:
    """PartitionSpec for logical `axes`. With `shape` and `mesh`, drops mesh axes that do not divide a dim
    (and any mesh axis already used by an earlier dim)."""
    table = dict(normalize_rules(rules) if rules is not None else current_rules())
    sizes = _axis_sizes(mesh) if mesh is not None else None
    used, spec = set(), []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        target = (target,) if isinstance(target, str) else tuple(target)
        kept = []
        for ax in target:
            if ax in used or (sizes is not None and ax not in sizes):
                continue
            if sizes is not None and shape is not None:
                if shape[i] % (math.prod(sizes[a] for a in kept) * sizes[ax]):
                    continue
            kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def _is_var(x):
    return isinstance(x, nnx.Variable)


def variable_axes(var) -> tuple:
    axes = var.get_metadata().get("out_sharding")
    return tuple(axes) if axes is not None else (None,) * len(var.shape)


def param_shardings(abstract_state, mesh: Mesh, rules=None):
    """NamedSharding for each parameter of an (abstract) nnx.State, from its logical-axis metadata."""
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, logical_to_spec(variable_axes(v), v.shape, mesh, rules))),
        abstract_state, is_leaf=_is_var)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x, axes):
    """with_sharding_constraint by logical axes; a no-op when no mesh is set (plain single-device code)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int, rules=None, shape=None) -> NamedSharding:
    axes = ("act_batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def _global_batch(x, mesh: Mesh, rules):
    """(host array, global shape, sharding) of one process's rows of a batch array."""
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return x, global_shape, batch_sharding(mesh, x.ndim, rules, global_shape)


def shard_batch(batch, mesh: Mesh, rules=None):
    """Place a host batch on the mesh, batch dim split over data x fsdp.

    Each process passes only its own rows (its slice of the global batch); on one process that is all of it.
    """
    def put(x):
        x, shape, sharding = _global_batch(x, mesh, rules)
        return jax.make_array_from_process_local_data(sharding, x, shape)
    return jax.tree.map(put, batch)


def abstract_batch(batch, mesh: Mesh, rules=None):
    """The global shapes and shardings `shard_batch` would give a host batch, placing nothing (for compiling
    ahead of time, also for a mesh of a target's abstract devices)."""
    def spec(x):
        x, shape, sharding = _global_batch(x, mesh, rules)
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)
    return jax.tree.map(spec, batch)


def init_sharded(constructor, mesh: Mesh, rules=None, seed: int = 0):
    """Build an NNX module straight into its sharding: nothing is materialised whole on one device.

    `constructor(rngs)` returns the module. Returns (graphdef, state).
    """
    abstract = nnx.eval_shape(lambda: constructor(nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = param_shardings(abs_state, mesh, rules)

    def make(key):
        return nnx.state(constructor(nnx.Rngs(key)))

    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)(jax.random.key(seed))
    return graphdef, state


def abstract_with_shardings(abs_state, shardings):
    """ShapeDtypeStructs carrying target shardings (for Orbax restore and streaming loads)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one numpy array on every host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    full = jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
    return np.asarray(full.addressable_data(0))
