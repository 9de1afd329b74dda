"""Reward model (`task="rm"`): a scalar head read at each row's last real token, Bradley-Terry loss.

The last real token is located from the attention mask (the rows are right-padded), never from token ids:
a pad id may equal EOS. The model has no LM head; it exports as HF *ForSequenceClassification.
With `rm.normalize_reward`, the mean and std of the rewards over the eval set (the train set when there is
none) are measured after training and stored in the model config (`reward_mean`, `reward_std`, also in the
HF config.json); `rewards()` applies them, the raw `score` head is unchanged.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import JaxalignError, models
from jaxalign.data.pipeline import stack_pairs
from jaxalign.losses.reward import reward_losses
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.parallel import multihost
from jaxalign.train.loop import Task, evaluate, initial_params


def last_token_scores(model, rows):
    """The scalar head at each row's last real token: [rows]."""
    hidden = model.hidden_states(rows["input_ids"], rows["attention_mask"])
    return jnp.take_along_axis(model.scores(hidden), last_index(rows["attention_mask"])[:, None], axis=1)[:, 0]


def last_index(mask):
    """Index of each row's last nonzero entry ([B]; 0 for an empty row): the last real token of rows padded
    on either side."""
    T = mask.shape[-1]
    flipped = jnp.argmax(jnp.asarray(mask)[..., ::-1] > 0, axis=-1)
    return jnp.where(jnp.any(mask > 0, axis=-1), T - 1 - flipped, 0)


class FrozenRewardModel:
    """A reward model (jaxalign RM or HF *ForSequenceClassification directory) held frozen for online RL:
    score(rows) gives this process's rows' normalised scores (numpy), one jitted forward per call."""

    def __init__(self, cfg, path: str, model_cfg, mesh, rules, field: str):
        rm_cfg = models.load_config(path, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
        if not rm_cfg.num_labels:
            raise JaxalignError(f"{field} {path}: not a reward model (no scalar head)")
        graphdef = models.abstract_params(rm_cfg)[0]
        self.params, self.mesh, self.rules = initial_params(cfg, rm_cfg, mesh, rules, source=path), mesh, rules
        self._score = jax.jit(lambda p, b: rewards(nnx.merge(graphdef, p), b))

    def score(self, rows):
        dev = mesh_lib.shard_batch({k: rows[k] for k in ("input_ids", "attention_mask")}, self.mesh, self.rules)
        with jax.set_mesh(self.mesh):
            out = self._score(self.params, dev)
        return multihost.local_rows(mesh_lib.to_host(out), len(rows["input_ids"]))


def rewards(model, rows):
    """Rewards of rows (padded on either side), normalised with the model's stored statistics (if any)."""
    cfg = model.config
    return (last_token_scores(model, rows) - cfg.reward_mean) / cfg.reward_std


def _moments(name, x, w):
    n = jnp.sum(w)
    return {name: (jnp.sum(x * w), n), name + "_sq": (jnp.sum(x * x * w), n)}


def rm_loss(model, batch, rng, cfg, aux):
    r = last_token_scores(model, stack_pairs(batch))
    B = batch["chosen_input_ids"].shape[0]
    rc, rr = r[:B], r[B:]
    losses = reward_losses(rc, rr, batch["margin"], cfg.rm.center_coef or None)
    w = batch["weight"]
    n = jnp.sum(w)
    metrics = {"accuracy": (jnp.sum((rc > rr) * w), n), "margin": (jnp.sum((rc - rr) * w), n),
               **_moments("rewards/chosen", rc, w), **_moments("rewards/rejected", rr, w)}
    return jnp.sum(losses * w), n, metrics


def rm_model_config(model_cfg, cfg):
    return model_cfg.replace(num_labels=1, lm_head=False)


def rm_finish(cfg, model_cfg, graphdef, params, datasets, mesh, rules, log):
    """Measure the reward mean/std (rm.normalize_reward) and store them in the model config."""
    if not cfg.rm.normalize_reward:
        return model_cfg
    data = datasets[1] if datasets[1] is not None else datasets[0]

    def stats(params, batch, aux):
        r = last_token_scores(nnx.merge(graphdef, params), stack_pairs(batch))
        return _moments("reward", r, jnp.concatenate([batch["weight"]] * 2))

    m = evaluate(jax.jit(stats), params, data, cfg, TASK, mesh, rules)
    mean, std = m["eval/reward"], max(m["eval/reward_std"], 1e-6)
    log(f"reward normalisation: mean {mean:.4g}, std {std:.4g} (stored in the model config)")
    return model_cfg.replace(reward_mean=float(mean), reward_std=float(std))


TASK = Task("rm", rm_loss, model_config=rm_model_config, finish=rm_finish)
