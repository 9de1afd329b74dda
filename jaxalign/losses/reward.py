"""Reward-model pairwise loss (Bradley-Terry), as TRL's RewardTrainer and OpenRLHF's PairWiseLoss.

reward_losses is the per-pair form (losses [B], per-pair metrics) that the trainer sums with the pairs'
weights; reward_loss is its mean over the batch. Outputs have the rewards' dtype."""
import jax
import jax.numpy as jnp

from jaxalign.losses.reduce import mean_loss


def reward_losses(chosen_rewards, rejected_rewards, margin=None, center_coef=None):
    """Per-pair (-log sigmoid(r_c - r_r - margin) (+ center_coef * (r_c + r_r)^2), metrics)."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -jax.nn.log_sigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    dtype = jnp.result_type(chosen_rewards, rejected_rewards)
    metrics = {"accuracy": (chosen_rewards > rejected_rewards).astype(dtype),
               "margin": chosen_rewards - rejected_rewards,
               "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards}
    return losses, metrics


def reward_loss(chosen_rewards, rejected_rewards, margin=None, center_coef=None):
    """The mean of reward_losses over the batch: (loss, metrics)."""
    return mean_loss(reward_losses(chosen_rewards, rejected_rewards, margin, center_coef))
