"""Supervised fine-tuning: token-mean negative log-likelihood over completion (assistant) tokens."""
import jax.numpy as jnp


def sft_loss(token_logps, mask):
    """Mean NLL over masked tokens of the batch. Returns (loss, metrics).

    The trainer sums numerator and token count over micro-batches and devices instead, so accumulation
    gives the same global token mean as one big batch."""
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    loss = -jnp.sum(token_logps * mask) / n
    return loss, {"nll": loss, "tokens": jnp.sum(mask)}
