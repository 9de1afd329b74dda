"""AdamW with warmup + cosine/linear/constant decay, global-norm clipping, and weight decay that skips
norm scales and biases (as TRL/HF). Parameters stay in their own dtype (fp32 master weights by default);
compute dtype is a model setting."""
from typing import Callable, NamedTuple

import jax
import optax

NO_DECAY = ("scale", "bias")  # parameter leaf names that take no weight decay (norms, biases)


def schedule(lr: float, kind: str, warmup_steps: int, total_steps: int, end_factor: float = 0.0):
    warmup_steps = min(max(warmup_steps, 0), max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_factor)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, lr * end_factor, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule={kind!r}: expected cosine, linear or constant")
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def decay_mask(params):
    """True for parameters that take weight decay: every weight but norm scales and biases."""
    def keep(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) not in NO_DECAY
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg_optim, total_steps: int):
    """(optax transformation, lr schedule) from the `optim` config section."""
    lr = schedule(cfg_optim.lr, cfg_optim.schedule, cfg_optim.warmup_steps, total_steps)
    parts = []
    if cfg_optim.clip_norm and cfg_optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg_optim.clip_norm))
    parts.append(optax.adamw(lr, b1=cfg_optim.b1, b2=cfg_optim.b2, eps=cfg_optim.eps,
                             weight_decay=cfg_optim.weight_decay, mask=decay_mask))
    return optax.chain(*parts), lr


class PerModel(NamedTuple):
    """One optimizer per model of a {name: params} tree (PPO's actor and critic), each clipping on its own.
    (Not optax.multi_transform: its masked inner states do not map onto parameter shardings.)"""
    init: Callable
    update: Callable
    txs: dict


def per_model(txs: dict) -> PerModel:
    def init(params):
        return {k: tx.init(params[k]) for k, tx in txs.items()}

    def update(updates, state, params=None):
        out = {k: tx.update(updates[k], state[k], None if params is None else params[k]) for k, tx in txs.items()}
        return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}

    return PerModel(init, update, txs)
