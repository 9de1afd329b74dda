"""Per-token log-probs from hidden states, in sequence chunks: a full [B, T, V] logits tensor is never
materialised, in the forward or (thanks to rematerialisation per chunk) in the backward pass.

Convention (as TRL): logits at t predict token t+1, so callers pass hidden[:, :-1] and targets ids[:, 1:]
(`shift`). RL paths divide the logits by the sampling temperature.
"""
import jax
import jax.numpy as jnp


def shift(hidden, input_ids, mask):
    """(hidden[:, :-1], targets = input_ids[:, 1:], mask[:, 1:]): position t scores token t+1."""
    return hidden[:, :-1], input_ids[:, 1:], mask[:, 1:]


def token_logprobs(hidden, head, targets, *, temperature: float = 1.0, chunk_size: int = 128,
                   with_stats: bool = False):
    """log p(targets) [B, T] from hidden [B, T, D] and the output projection head [D, V], computed in
    float32 at least (float64 for float64 inputs; bfloat16 logits are upcast).

    with_stats also returns {"entropy": [B, T], "correct": [B, T] (argmax == target)}, both without
    gradient."""
    B, T, D = hidden.shape
    c = min(chunk_size, T)
    n = -(-T // c)
    pad = n * c - T
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)

    @jax.checkpoint  # keep only the chunk's inputs for the backward pass, not its [B, c, V] logits
    def one(args):
        h_c, y_c = args
        logits = h_c @ head
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        if temperature != 1.0:
            logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0] - lse
        if not with_stats:
            return logp, ()
        sg = jax.lax.stop_gradient(logits)
        probs = jnp.exp(sg - jax.lax.stop_gradient(lse)[..., None])
        entropy = jax.lax.stop_gradient(lse) - jnp.sum(probs * sg, axis=-1)
        correct = jnp.argmax(sg, axis=-1) == y_c
        return logp, (entropy, correct)

    logp, stats = jax.lax.map(one, (h, y))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(B, n * c)[:, :T]
    logp = unchunk(logp)
    if not with_stats:
        return logp
    return logp, {"entropy": unchunk(stats[0]), "correct": unchunk(stats[1])}


def masked_sum(x, mask, axis=None):
    return jnp.sum(x * mask, axis=axis)


def sequence_logprobs(token_logps, mask, average: bool = False):
    """Sum (or, for IPO/SimPO/ORPO, the mean) of completion token log-probs per row."""
    total = masked_sum(token_logps, mask, axis=-1)
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1) if average else total
