"""The train state: a plain dict pytree {step, params, opt_state, rng}, created and kept sharded.

params is the model's pure dict (nnx.to_pure_dict); optimizer-state shardings mirror the params'
(optax.tree_map_params), everything else is replicated."""
import jax
import jax.numpy as jnp
import optax

from jaxalign.parallel.mesh import abstract_with_shardings, replicated
from jaxalign.train.optim import PerModel


def opt_state_shardings(tx, params_abstract, params_shardings, mesh):
    """Optimizer-state shardings that follow the parameters' (moments sharded like their weights)."""
    if isinstance(tx, PerModel):
        return {k: opt_state_shardings(t, params_abstract[k], params_shardings[k], mesh) for k, t in tx.txs.items()}
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    return optax.tree_map_params(tx, lambda _, s: s, opt_abstract, params_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def state_shardings(tx, params_abstract, params_shardings, mesh):
    opt_shardings = opt_state_shardings(tx, params_abstract, params_shardings, mesh)
    return {"step": replicated(mesh), "params": params_shardings, "opt_state": opt_shardings,
            "rng": replicated(mesh)}


def abstract_state(tx, params_abstract, shardings):
    """ShapeDtypeStructs of the whole train state with shardings (restore target)."""
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_abstract,
              "opt_state": jax.eval_shape(tx.init, params_abstract),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    return abstract_with_shardings(shapes, shardings)


def init_state(tx, params, shardings, seed: int):
    def make(p):
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p),
                "rng": jax.random.PRNGKey(seed)}
    return jax.jit(make, out_shardings=shardings, donate_argnums=0)(params)
