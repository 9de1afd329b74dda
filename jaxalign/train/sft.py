"""SFT: token-mean negative log-likelihood on completion (assistant) tokens, packing-aware.

Metrics: token_accuracy (argmax == target on completion tokens), entropy, and exact_match: the share of
rows whose every completion token is the argmax, i.e. rows that greedy decoding reproduces exactly."""
import jax.numpy as jnp

from jaxalign.losses.logprobs import shift, token_logprobs
from jaxalign.losses.sft import sft_sums
from jaxalign.train.task import Task, register


def completion_logprobs(model, batch, cfg, with_stats=True, temperature: float = 1.0):
    """Per-token log-probs [B, T-1] of each next token, stats (with_stats) and the completion mask.
    RL paths pass the sampling temperature: the log-probs are those of softmax(logits / temperature)."""
    ids = batch["input_ids"]
    hidden = model.hidden_states(ids, batch["attention_mask"], positions=batch.get("positions"),
                                 segment_ids=batch.get("segment_ids"))
    h, targets, mask = shift(hidden, ids, batch["completion_mask"])
    mask = mask.astype(jnp.float32)
    if "segment_ids" in batch:  # a segment's first token is not predicted from the previous segment
        seg = batch["segment_ids"]
        mask = mask * (seg[:, 1:] == seg[:, :-1])
    out = token_logprobs(h, model.head_kernel(), targets, chunk_size=cfg.train.logprob_chunk,
                         with_stats=with_stats, temperature=temperature)
    return (*out, mask) if with_stats else (out, mask)


def sft_loss(model, batch, rng, cfg, aux=None):
    token_logps, stats, mask = completion_logprobs(model, batch, cfg)
    return sft_sums(token_logps, mask, stats)  # (NLL sum, token count, token_accuracy/entropy/exact_match)


TASK = register(Task("sft", "sft", sft_loss))
