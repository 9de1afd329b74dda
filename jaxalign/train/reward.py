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

from jaxalign.data.pipeline import stack_pairs
from jaxalign.losses.reduce import weighted_sums
from jaxalign.losses.reward import reward_losses
from jaxalign.train.hooks import evaluate
from jaxalign.train.task import Memory, Task, register


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


def rewards(model, rows):
    """Rewards of rows (padded on either side), normalised with the model's stored statistics (if any)."""
    cfg = model.config
    return (last_token_scores(model, rows) - cfg.reward_mean) / cfg.reward_std


def _moments(name, x, w):
    n = jnp.sum(w)
    return {name: (jnp.sum(x * w), n), name + "_sq": (jnp.sum(x * x * w), n)}


def rm_loss(model, batch, rng, cfg, aux):
    scores = last_token_scores(model, stack_pairs(batch))
    B = batch["chosen_input_ids"].shape[0]
    chosen_rewards, rejected_rewards = scores[:B], scores[B:]
    losses, metrics = reward_losses(chosen_rewards, rejected_rewards, batch["margin"], cfg.rm.center_coef or None)
    w = batch["weight"]
    # the per-pair metrics' weighted sums, plus the second moments behind the logged rewards/*_std
    metrics = {**weighted_sums(metrics, w), **_moments("rewards/chosen", chosen_rewards, w),
               **_moments("rewards/rejected", rejected_rewards, w)}
    return jnp.sum(losses * w), jnp.sum(w), metrics


def rm_model_config(run):
    return run.model_cfg.replace(num_labels=1, lm_head=False)


def rm_finish(run, params):
    """Measure the reward mean/std (rm.normalize_reward) and store them in the model config."""
    if not run.cfg.rm.normalize_reward:
        return run.model_cfg
    data = run.eval_data if run.eval_data is not None else run.train_data

    def stats(params, batch, aux):
        r = last_token_scores(nnx.merge(run.graphdef, params), stack_pairs(batch))
        return _moments("reward", r, jnp.concatenate([batch["weight"]] * 2))

    m = evaluate(jax.jit(stats), params, data, run)
    mean, std = m["eval/reward"], max(m["eval/reward_std"], 1e-6)
    run.log(f"reward normalisation: mean {mean:.4g}, std {std:.4g} (stored in the model config)")
    return run.model_cfg.replace(reward_mean=float(mean), reward_std=float(std))


TASK = register(Task("rm", "preference", rm_loss, defaults=dict(center_coef=0.0, normalize_reward=False),
                     memory=Memory(sequences_per_row=lambda cfg: 2), model_config=rm_model_config,
                     finish=rm_finish))
