"""The pure train and eval steps: (state, batch, aux, frozen) -> (state, report), jitted once per shape.

A task's loss returns its batch unreduced, (loss_sum, denominator, {metric: (sum, count)}); the step sums
micro-batches (so the result is the global mean whatever the micro-batch size, accumulation steps or mesh),
clips and applies the optimizer, and keeps the old state when the loss or a gradient is not finite.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign.models.layers import lora_dropout
from jaxalign.parallel import mesh as mesh_lib


def merge(graphdef, params):
    """The model (or, for multi-model tasks, {name: model}) a loss receives."""
    if isinstance(graphdef, dict):
        return {k: nnx.merge(g, params[k]) for k, g in graphdef.items()}
    return nnx.merge(graphdef, params)


def no_frozen(params, frozen):
    """The default composition: the trained params are the whole model."""
    return params


def with_std(metrics: dict) -> dict:
    """Each `<name>_sq` (a mean of squares) next to its mean `<name>` becomes `<name>_std`."""
    sq = [k for k in metrics if k.endswith("_sq") and k[:-3] in metrics]
    out = {k: v for k, v in metrics.items() if k not in sq}
    for k in sq:
        out[k[:-3] + "_std"] = jnp.sqrt(jnp.maximum(metrics[k] - metrics[k[:-3]] ** 2, 0.0))
    return out


def split_micro(x, n):
    """[B, ...] -> [n, B/n, ...] taking rows i::n into micro-batch i, so each micro-batch spans every
    data-parallel shard (a contiguous split would put each micro-batch on a few devices only)."""
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return mesh_lib.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))


def with_pre_step(task, graphdef, params, batch, key, cfg, aux):
    if task.pre_step is None:
        return batch
    extra = task.pre_step(merge(graphdef, params), batch, key, cfg, aux)
    return {**batch, **jax.lax.stop_gradient(extra)}


def make_train_step(task, graphdef, tx, lr_fn, cfg, n_micro: int, compose=no_frozen, dropout: float = 0.0,
                    ref_is_base: bool = False):
    """step(state, batch, aux, frozen) -> (state, report). `compose(params, frozen)` gives the params a model
    runs with (LoRA: the adapters laid over the frozen base). `ref_is_base`: the task's reference (aux["ref"])
    is that frozen base, passed once as `frozen` and put back into aux here (the same arrays as two jit
    arguments would be counted twice by XLA's memory analysis)."""

    def loss_fn(params, batch, key, aux, frozen):
        model = merge(graphdef, compose(params, frozen))
        if not dropout:
            return _loss(model, batch, key, aux)
        key, sub = jax.random.split(key)
        with lora_dropout(dropout, jax.random.fold_in(sub, 0)):
            return _loss(model, batch, key, aux)

    def _loss(model, batch, key, aux):
        loss_sum, denom, mets = task.loss(model, batch, key, cfg, aux)
        return loss_sum, (denom, mets)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def mean_loss_fn(params, batch, key, aux, frozen):
        """The loss already divided by its (parameter-independent) denominator: gradients come out scaled, with
        no second gradient-sized buffer for `grads / denom`."""
        loss_sum, (denom, mets) = loss_fn(params, batch, key, aux, frozen)
        return loss_sum / jnp.maximum(jax.lax.stop_gradient(denom), 1e-9), (loss_sum, denom, mets)

    mean_grad_fn = jax.value_and_grad(mean_loss_fn, has_aux=True)

    def step(state, batch, aux, frozen=None):
        if ref_is_base:
            aux = {**aux, "ref": frozen}
        rng, key = jax.random.split(state["rng"])
        params = state["params"]
        batch = with_pre_step(task, graphdef, compose(params, frozen), batch, key, cfg, aux)
        if n_micro == 1:  # no accumulation scan: its zeroed accumulators and adds cost ~10% of a CPU step
            (_, (loss_sum, denom, mets)), grads = mean_grad_fn(params, batch, key, aux, frozen)
        else:
            micro = jax.tree.map(lambda x: split_micro(x, n_micro), batch)
            keys = jax.random.split(key, n_micro)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, params, first, keys[0], aux, frozen)
            init = (jax.tree.map(jnp.zeros_like, shapes[1]), jax.tree.map(jnp.zeros_like, shapes[0]))

            def body(carry, xs):
                (grads, (loss, (denom, mets))) = carry
                (l, (d, m)), g = grad_fn(params, *xs, aux, frozen)
                return (jax.tree.map(jnp.add, grads, g),
                        (loss + l, (denom + d, jax.tree.map(jnp.add, mets, m)))), None

            (grads, (loss_sum, (denom, mets))), _ = jax.lax.scan(body, init, (micro, keys))
        denom = jnp.maximum(denom, 1e-9)
        if n_micro > 1:
            grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        # Decided before the update (a finite gradient norm means every gradient is finite, and the optimizers
        # here map finite gradients to finite updates), so the select fuses into the optimizer's elementwise pass
        # and updates the donated buffers in place. (A lax.cond instead costs the GPU compiler a copy of every
        # large parameter in the skip branch: 1B at 4096 tokens on an H200, 18.9 -> 32.2 GiB.)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        out = {"step": state["step"] + 1, "params": keep(new_params, params),
               "opt_state": keep(opt_state, state["opt_state"]), "rng": rng}
        report = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state["step"]),
                  "nonfinite": 1.0 - finite.astype(jnp.float32)}
        report.update(with_std({k: s / jnp.maximum(c, 1e-9) for k, (s, c) in mets.items()}))
        return out, report

    return step


def make_eval_step(task, graphdef, cfg):
    """eval(params, batch, aux) -> {"loss": (sum, denominator), metric: (sum, count)} of one batch."""
    def step(params, batch, aux):
        key = jax.random.PRNGKey(0)
        batch = with_pre_step(task, graphdef, params, batch, key, cfg, aux)
        loss_sum, denom, mets = task.loss(merge(graphdef, params), batch, key, cfg, aux)
        return {"loss": (loss_sum, denom), **mets}
    return step
