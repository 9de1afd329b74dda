"""The two reductions of per-example metrics: the batch mean (the public `*_loss` functions) and weighted
(sum, count) pairs (the trainers, which add them over micro-batches and devices and divide once).

A per-example metric is one of
  values [B]            the mean over the examples;
  (values [B], mask [B]) the mean over the examples where mask is 1 (KTO's per-class rewards);
  a scalar              a batch-level value (KTO's KL reference point), its own mean.
"""
import jax.numpy as jnp


def mean_metrics(per_example: dict) -> dict:
    """{name: batch mean}. A masked mean over no example is 0."""
    out = {}
    for name, v in per_example.items():
        if isinstance(v, tuple):
            values, mask = v
            out[name] = jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)
        elif jnp.ndim(v) == 0:
            out[name] = v
        else:
            out[name] = jnp.mean(v)
    return out


def weighted_sums(per_example: dict, weight) -> dict:
    """{name: (sum, count)} with each example weighted by `weight` [B] (0 for padding rows): sum / count over
    the global batch is the weighted form of mean_metrics."""
    out = {}
    for name, v in per_example.items():
        if isinstance(v, tuple):
            values, mask = v
            w = mask * weight
            out[name] = (jnp.sum(values * w), jnp.sum(w))
        elif jnp.ndim(v) == 0:
            out[name] = (v * jnp.sum(weight), jnp.sum(weight))
        else:
            out[name] = (jnp.sum(v * weight), jnp.sum(weight))
    return out


def mean_loss(per_example_out):
    """(mean loss, mean metrics) from a per-example form's (losses [B], per-example metrics)."""
    losses, metrics = per_example_out
    return jnp.mean(losses), mean_metrics(metrics)
