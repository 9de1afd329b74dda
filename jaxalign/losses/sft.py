"""Supervised fine-tuning: token-mean negative log-likelihood over completion (assistant) tokens.

sft_sums is the form the trainer uses: (NLL sum, token count, metrics as (sum, count) pairs), which it adds
over micro-batches and devices and divides once, so accumulation gives the same global token mean as one
big batch. sft_loss divides here. Outputs have the log-probs' dtype (the mask is cast to it)."""
import jax.numpy as jnp


def sft_sums(token_logps, mask, stats=None):
    """(-sum of masked token log-probs, masked token count, metrics) over a batch [B, T].

    With stats ({"correct": [B, T] argmax == target, "entropy": [B, T]}, as token_logprobs(with_stats=True)
    gives) the metrics are token_accuracy and entropy (token means) and exact_match: the share of rows
    with completion tokens whose every completion token is the argmax (greedy decoding reproduces them)."""
    mask = mask.astype(token_logps.dtype)
    tokens = jnp.sum(mask)
    metrics = {}
    if stats is not None:
        row_has = jnp.sum(mask, axis=1) > 0
        row_exact = jnp.all((stats["correct"] > 0) | (mask == 0), axis=1) & row_has
        metrics = {"token_accuracy": (jnp.sum(stats["correct"] * mask), tokens),
                   "entropy": (jnp.sum(stats["entropy"] * mask), tokens),
                   "exact_match": (jnp.sum(row_exact), jnp.sum(row_has))}
    return -jnp.sum(token_logps * mask), tokens, metrics


def sft_loss(token_logps, mask, stats=None):
    """Mean NLL over the masked tokens of the batch: (loss, metrics) with metrics nll (= loss), tokens and,
    with stats, the means of sft_sums' metrics."""
    total, tokens, sums = sft_sums(token_logps, mask, stats)
    loss = total / jnp.maximum(tokens, 1)
    means = {k: (s / jnp.maximum(n, 1)).astype(loss.dtype) for k, (s, n) in sums.items()}
    return loss, {"nll": loss, "tokens": tokens, **means}
