"""Reward model (`task="rm"`): a scalar head read at each row's last real token, Bradley-Terry loss.

The last real token is located from the attention mask (the rows are right-padded), never from token ids:
a pad id may equal EOS. The model has no LM head; it exports as HF *ForSequenceClassification.
"""
import jax.numpy as jnp

from jaxalign.data.pipeline import stack_pairs
from jaxalign.losses.reward import reward_losses
from jaxalign.train.loop import Task


def last_token_scores(model, rows):
    """The scalar head at each row's last real token: [rows]."""
    hidden = model.hidden_states(rows["input_ids"], rows["attention_mask"])
    scores = model.scores(hidden)
    last = jnp.maximum(jnp.sum(rows["attention_mask"], axis=1) - 1, 0)
    return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]


def rm_loss(model, batch, rng, cfg, aux):
    rewards = last_token_scores(model, stack_pairs(batch))
    B = batch["chosen_input_ids"].shape[0]
    rc, rr = rewards[:B], rewards[B:]
    losses = reward_losses(rc, rr, batch["margin"], cfg.rm.center_coef or None)
    w = batch["weight"]
    n = jnp.sum(w)
    metrics = {"accuracy": (jnp.sum((rc > rr) * w), n), "margin": (jnp.sum((rc - rr) * w), n),
               "rewards/chosen": (jnp.sum(rc * w), n), "rewards/rejected": (jnp.sum(rr * w), n),
               "rewards/chosen_sq": (jnp.sum(rc * rc * w), n), "rewards/rejected_sq": (jnp.sum(rr * rr * w), n)}
    return jnp.sum(losses * w), n, metrics


def rm_model_config(model_cfg, cfg):
    return model_cfg.replace(num_labels=1, lm_head=False)


TASK = Task("rm", rm_loss, model_config=rm_model_config)
