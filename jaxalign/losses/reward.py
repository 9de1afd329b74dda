"""Reward-model pairwise loss (Bradley-Terry), as TRL's RewardTrainer and OpenRLHF's PairWiseLoss."""
import jax
import jax.numpy as jnp


def reward_losses(chosen_rewards, rejected_rewards, margin=None, center_coef=None):
    """Per-pair -log sigmoid(r_c - r_r - margin) (+ center_coef * (r_c + r_r)^2)."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -jax.nn.log_sigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def reward_loss(chosen_rewards, rejected_rewards, margin=None, center_coef=None):
    losses = reward_losses(chosen_rewards, rejected_rewards, margin, center_coef)
    metrics = {"accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
               "margin": jnp.mean(chosen_rewards - rejected_rewards),
               "rewards/chosen": jnp.mean(chosen_rewards), "rewards/rejected": jnp.mean(rejected_rewards)}
    return jnp.mean(losses), metrics
