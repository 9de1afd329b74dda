"""KV-cache generation in one compiled program: prefill, then a `lax.while_loop` of decode steps that stops
as soon as every row has stopped.

Prompts are left-padded (every row's next token goes to the same cache slot). The cache is allocated inside
the program, sized prompt + max_new_tokens, batch sharded over data x fsdp and kv heads over model, using the
trainer's parameter arrays as they are.

Per step, as `transformers` orders its processors: repetition penalty, no-repeat n-gram ban, then
temperature, top-k, top-p, min-p; then argmax (temperature 0) or a draw. The reported log-prob of each token
is under softmax(raw logits / temperature) (temperature 1 when greedy): what a training forward computes
(RL divides logits by the sampling temperature). When a penalty or a truncation removed probability from
that distribution at some step, the row's `truncated` flag says so (RL configs can refuse such samples:
their log-probs are not those of the distribution the tokens were drawn from).

Randomness is per row: row r's draw at step t uses fold_in(fold_in(key, row_ids[r]), t), so a row's sample
does not depend on the batch it was placed in, its padding, or the mesh.
"""
import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import JaxalignError
from jaxalign.models.layers import KVCache
from jaxalign.parallel import mesh as mesh_lib

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static generation settings (hashable: one compiled program per distinct setting and shape)."""
    max_new_tokens: int = 256
    temperature: float = 1.0            # 0 = greedy
    top_k: int = 0                      # 0 = off
    top_p: float = 1.0                  # 1 = off
    min_p: float = 0.0                  # 0 = off
    repetition_penalty: float = 1.0     # 1 = off (CTRL / transformers semantics)
    no_repeat_ngram_size: int = 0       # 0 = off
    stop_token_ids: tuple = ()          # EOS ids and any other stop tokens
    pad_token_id: int = 0               # written after a row stops

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise JaxalignError(f"sampling: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def modifies_distribution(self) -> bool:
        """Whether any setting can move the sampling distribution off softmax(logits / temperature)."""
        return bool(self.top_k or self.top_p < 1 or self.min_p or self.repetition_penalty != 1
                    or self.no_repeat_ngram_size)


class SampleOutput(NamedTuple):
    tokens: jax.Array          # [B, N] int32, pad_token_id after a row stopped
    lengths: jax.Array         # [B] generated tokens, the stop token included
    stopped_on_eos: jax.Array  # [B] bool: the row ended on a stop token (not on max_new_tokens)
    logprobs: jax.Array        # [B, N] float32 log-probs under softmax(logits / T); 0 after the stop
    truncated: jax.Array       # [B] bool: a penalty/top-k/top-p/min-p removed probability at some step


# ----------------------------------------------------------------------------- logits processing

def apply_repetition_penalty(logits, seen, penalty: float):
    """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' logits divided (if > 0) or multiplied."""
    if penalty == 1:
        return logits
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def banned_ngram_tokens(seq, valid, cur, n: int, vocab: int):
    """[B, V] bool: tokens that would repeat an n-gram already in seq[:, :cur] (valid marks real tokens)."""
    B, L = seq.shape
    W = L - n + 1
    if W <= 0:  # no n-gram fits in the whole sequence: nothing to ban (as transformers)
        return jnp.zeros((B, vocab), bool)
    windows = jnp.stack([seq[:, k:k + W] for k in range(n)], axis=-1)             # [B, W, n]
    ok = jnp.stack([valid[:, k:k + W] for k in range(n)], axis=-1).all(-1)      # [B, W]
    last = jax.lax.dynamic_slice_in_dim(seq, cur - (n - 1), n - 1, axis=1)      # [B, n-1]
    last_ok = jax.lax.dynamic_slice_in_dim(valid, cur - (n - 1), n - 1, axis=1).all(-1)
    match = (windows[:, :, :-1] == last[:, None, :]).all(-1) & ok & (jnp.arange(W) + n <= cur)[None]
    match = match & last_ok[:, None] & (cur >= n - 1)
    banned = jnp.zeros((B, vocab), bool)
    return banned.at[jnp.arange(B)[:, None], windows[:, :, -1]].max(match)


def truncate_logits(scaled, sp: SamplingParams):
    """top-k, top-p (smallest set with mass >= top_p, at least one token), min-p on temperature-scaled logits."""
    if sp.top_k and sp.top_k < scaled.shape[-1]:
        kth = jax.lax.top_k(scaled, sp.top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, NEG_INF, scaled)
    if sp.top_p < 1:
        desc = jnp.sort(scaled, axis=-1, descending=True)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                      # mass strictly above each token
        keep = before < sp.top_p
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < threshold, NEG_INF, scaled)
    if sp.min_p:
        probs = jax.nn.softmax(scaled, axis=-1)
        floor = sp.min_p * jnp.max(probs, axis=-1, keepdims=True)
        scaled = jnp.where(probs < floor, NEG_INF, scaled)
    return scaled


def choose(logits, keys, seen, seq, valid, cur, sp: SamplingParams):
    """One step: (token [B], its log-prob under softmax(logits / T) [B], whether the distribution was cut)."""
    logits = logits.astype(jnp.float32)
    T = sp.temperature if not sp.greedy else 1.0
    reference = jax.nn.log_softmax(logits / T, axis=-1)
    x = apply_repetition_penalty(logits, seen, sp.repetition_penalty)
    if sp.no_repeat_ngram_size:
        x = jnp.where(banned_ngram_tokens(seq, valid, cur, sp.no_repeat_ngram_size, x.shape[-1]), NEG_INF, x)
    x = truncate_logits(x / T, sp)
    if sp.modifies_distribution:  # bitwise equal where nothing touched the logits
        cut = jnp.any(x != logits / T, axis=-1)
    else:
        cut = jnp.zeros(logits.shape[:1], bool)
    if sp.greedy:
        token = jnp.argmax(x, axis=-1)
    else:
        token = jax.vmap(jax.random.categorical)(keys, x)
    token = token.astype(jnp.int32)
    logp = jnp.take_along_axis(reference, token[:, None], axis=-1)[:, 0]
    return token, logp, cut


# ------------------------------------------------------------------------------------- the program

def _step_keys(row_keys, t):
    return jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)


@functools.partial(jax.jit, static_argnames=("graphdef", "sp", "rules"))
def sample(graphdef, params, input_ids, attention_mask, rng, row_ids, sp: SamplingParams, rules=None):
    """Generate from left-padded prompts [B, P]. Pure and jitted; call it under `jax.set_mesh(mesh)`."""
    with mesh_lib.use_rules(rules if rules is not None else mesh_lib.current_rules()):
        return _sample(graphdef, params, input_ids, attention_mask, rng, row_ids, sp)


def _sample(graphdef, params, input_ids, attention_mask, rng, row_ids, sp):
    model = nnx.merge(graphdef, params)
    cfg = model.config
    B, P = input_ids.shape
    N, V = sp.max_new_tokens, cfg.vocab_size
    input_ids = mesh_lib.constrain(input_ids.astype(jnp.int32), ("act_batch", None))
    attention_mask = mesh_lib.constrain(attention_mask.astype(bool), ("act_batch", None))
    row_keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(row_ids)
    stops = jnp.asarray(sp.stop_token_ids or (-1,), jnp.int32)

    cache = KVCache.init(cfg, B, P + N)
    kv_axes = (None, "act_batch", "kv_heads", None, None)
    cache = cache._replace(k=mesh_lib.constrain(cache.k, kv_axes), v=mesh_lib.constrain(cache.v, kv_axes))
    hidden, cache = model.hidden_states(input_ids, attention_mask, cache=cache)
    logits = model.logits(hidden[:, -1:])[:, 0]

    # Token history (for the penalties): the prompt, then the generated tokens.
    seq = jnp.concatenate([input_ids, jnp.full((B, N), sp.pad_token_id, jnp.int32)], axis=1)
    valid = jnp.concatenate([attention_mask, jnp.zeros((B, N), bool)], axis=1)
    seen = jnp.zeros((B, V), bool)
    if sp.repetition_penalty != 1:
        seen = seen.at[jnp.arange(B)[:, None], input_ids].max(attention_mask)

    def emit(t, logits, state):
        tokens, logps, done, cut, seq, valid, seen = state
        token, logp, c = choose(logits, _step_keys(row_keys, t), seen, seq, valid, P + t, sp)
        live = ~done
        token = jnp.where(live, token, sp.pad_token_id)
        tokens = tokens.at[:, t].set(token)
        logps = logps.at[:, t].set(jnp.where(live, logp, 0.0))
        seq = seq.at[:, P + t].set(token)
        valid = valid.at[:, P + t].set(live)
        if sp.repetition_penalty != 1:
            seen = seen.at[jnp.arange(B), token].max(live)
        cut = cut | (c & live)
        done = done | jnp.isin(token, stops)
        return token, (tokens, logps, done, cut, seq, valid, seen)

    state = (jnp.full((B, N), sp.pad_token_id, jnp.int32), jnp.zeros((B, N), jnp.float32), jnp.zeros(B, bool),
             jnp.zeros(B, bool), seq, valid, seen)
    token, state = emit(0, logits, state)
    lengths = jnp.ones(B, jnp.int32)

    def cond(carry):
        t, _, _, state, _ = carry
        return (t < N) & ~jnp.all(state[2])

    def body(carry):
        t, token, cache, state, lengths = carry
        hidden, cache = model.hidden_states(token[:, None], jnp.ones((B, 1), bool), cache=cache)
        logits = model.logits(hidden)[:, 0]
        lengths = lengths + ~state[2]
        token, state = emit(t, logits, state)
        return t + 1, token, cache, state, lengths

    _, _, _, state, lengths = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, state, lengths))
    tokens, logps, done, cut, _, _, _ = state
    return SampleOutput(tokens, lengths, done, logps, cut)  # only a stop token sets `done`


# --------------------------------------------------------------------------------- the user API

def stop_ids(model_cfg, eos_token_id=None, stop_token_ids: Sequence[int] = ()) -> tuple:
    """EOS id(s) (the given ones, else the model config's) plus extra stop tokens, as a sorted tuple."""
    eos = model_cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, (int, np.integer)) else tuple(eos)
    return tuple(sorted({int(x) for x in (*eos, *stop_token_ids)}))


def generate(lm, input_ids, attention_mask=None, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, eos_token_id=None, stop_token_ids: Sequence[int] = (),
             pad_token_id: Optional[int] = None, seed: int = 0, row_ids=None) -> SampleOutput:
    """Generate from left-padded prompts with a loaded `jaxalign.loading.LM`.

    input_ids, attention_mask: [B, P] (mask default: all ones). `row_ids` [B] (default 0..B-1) key each
    row's randomness: the same (seed, row id, prompt) gives the same sample in any batch.
    """
    input_ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
        raise JaxalignError(f"generate: input_ids {input_ids.shape} and attention_mask {mask.shape} must be "
                            "the same [batch, length] shape")
    if not mask[:, -1].all():
        raise JaxalignError("generate: prompts must be left-padded (every row's last position a real token)")
    cfg = lm.config
    longest = int(mask.sum(axis=1).max()) + max_new_tokens - 1  # the last token is sampled, never fed back
    if cfg.position == "learned" and longest > cfg.max_position_embeddings:
        raise JaxalignError(f"generate: a prompt of {longest + 1 - max_new_tokens} tokens + max_new_tokens "
                            f"{max_new_tokens} needs {longest} positions; the model has "
                            f"{cfg.max_position_embeddings}")
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                        top_p=float(top_p), min_p=float(min_p), repetition_penalty=float(repetition_penalty),
                        no_repeat_ngram_size=int(no_repeat_ngram_size),
                        stop_token_ids=stop_ids(cfg, eos_token_id, stop_token_ids), pad_token_id=int(pad))
    rows = np.arange(len(input_ids), dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32)
    batch = mesh_lib.shard_batch({"input_ids": input_ids, "attention_mask": mask, "row_ids": rows},
                                 lm.mesh, lm.rules)
    with jax.set_mesh(lm.mesh):
        return sample(lm.graphdef, lm.pure_params(), batch["input_ids"], batch["attention_mask"],
                      jax.random.PRNGKey(seed), batch["row_ids"], sp, lm.rules)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1):
    """(input_ids, attention_mask) [B, P] numpy, left-padded; P rounded up to `multiple` (fewer compiles)."""
    P = max(len(p) for p in prompts)
    P = -(-P // multiple) * multiple
    ids = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p):], mask[i, P - len(p):] = p, True
    return ids, mask


def completions(out: SampleOutput) -> list:
    """Per row, the generated token ids without the stop token and padding (host lists)."""
    tokens, lengths, eos = (np.asarray(jax.device_get(x)) for x in (out.tokens, out.lengths, out.stopped_on_eos))
    return [tokens[i, :lengths[i] - int(eos[i])].tolist() for i in range(len(tokens))]
