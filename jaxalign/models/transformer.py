"""The decoder every family shares: embeddings, a scanned stack of pre-norm blocks, final norm, heads.

LLaMA/Mistral/Qwen2 and GPT-2 differ only in configuration (norm kind, gated MLP, RoPE vs learned
positions, biases); their HF weight layouts live in llama.py and gpt2.py.

Parameters of the block stack carry a leading `layers` dim and are applied with `jax.lax.scan` (one
compiled block however deep the model), optionally rematerialised per block.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models import splash
from jaxalign.models.config import ModelConfig
from jaxalign.models.layers import (KVCache, Linear, Norm, apply_rope, attention, cached_attention,
                                    current_lora_dropout, dense, make_mask, mlp, norm, param, prepare_weights,
                                    rope_inv_freq, rope_tables)
from jaxalign.parallel.mesh import constrain

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Blocks(nnx.Module):
    """All decoder blocks, each parameter stacked over a leading `layers` dim."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt, std = cfg.weights_dtype, cfg.initializer_range
        kw = dict(dtype=dt, rngs=rngs, std=std, layers=L, quantized=cfg.quantized)
        lora = lambda name: dict(lora_rank=cfg.lora_rank if f"layers/{name}" in cfg.lora_targets else 0)
        self.attn_norm = Norm(D, kind=cfg.norm, dtype=dt, layers=L)
        self.q = Linear((D,), (N, H), ("embed",), ("heads", "head_dim"), bias=cfg.qkv_bias, **kw, **lora("q"))
        self.k = Linear((D,), (K, H), ("embed",), ("kv_heads", "head_dim"), bias=cfg.qkv_bias, **kw, **lora("k"))
        self.v = Linear((D,), (K, H), ("embed",), ("kv_heads", "head_dim"), bias=cfg.qkv_bias, **kw, **lora("v"))
        self.o = Linear((N, H), (D,), ("heads", "head_dim"), ("embed",), bias=cfg.o_bias, **kw, **lora("o"))
        self.mlp_norm = Norm(D, kind=cfg.norm, dtype=dt, layers=L)
        if cfg.gated_mlp:
            self.gate = Linear((D,), (F,), ("embed",), ("mlp",), bias=cfg.mlp_bias, **kw, **lora("gate"))
        self.up = Linear((D,), (F,), ("embed",), ("mlp",), bias=cfg.mlp_bias, **kw, **lora("up"))
        self.down = Linear((F,), (D,), ("mlp",), ("embed",), bias=cfg.mlp_bias, **kw, **lora("down"))


def block(cfg: ModelConfig, p: dict, x, rope, mask, dist, window, kv=None, index=None):
    """One pre-norm decoder block on hidden x [B, T, D]. With `kv` = (k, v, layer): the whole cache
    [L, B, K, S, Dh], updated in place (this layer's new keys/values written at slot `index`), and
    attention runs over this layer's slots."""
    h = norm(p["attn_norm"], x, cfg.norm, cfg.norm_eps)
    q, k, v = dense(p["q"], h), dense(p["k"], h), dense(p["v"], h)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    if kv is not None:
        K, V, layer = kv
        at = (layer, 0, 0, index, 0)
        K = jax.lax.dynamic_update_slice(K, k.swapaxes(1, 2).astype(K.dtype)[None], at)
        V = jax.lax.dynamic_update_slice(V, v.swapaxes(1, 2).astype(V.dtype)[None], at)
        k = jax.lax.dynamic_index_in_dim(K, layer, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(V, layer, keepdims=False)
        kv = (K, V)
        a = cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, dist, window)
    elif cfg.attention_impl == "splash":  # `mask` holds the segment ids (splash.segments)
        a = splash.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, splash.static_window(cfg.layer_windows))
    else:
        a = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, dist, window, cfg.attention_impl)
    x = x + dense(p["o"], a, contract=2)
    x = x + mlp(p, norm(p["mlp_norm"], x, cfg.norm, cfg.norm_eps), cfg.activation, cfg.gated_mlp)
    return constrain(x, ("act_batch", "act_length", "act_embed")), kv


def default_positions(attention_mask, segment_ids=None, offset=None):
    """Positions count real tokens (left padding starts at 0); packed segments restart at 0."""
    if segment_ids is not None:
        idx = jnp.arange(segment_ids.shape[1])[None, :]
        starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                  segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return jnp.maximum(pos, 0)


class CausalLM(nnx.Module):
    """Decoder-only LM with an optional scalar head (`score`, as HF *ForSequenceClassification)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        dt, D = cfg.weights_dtype, cfg.hidden_size
        self.embed = param(rngs, (cfg.vocab_size, D), ("vocab", "embed"), dt, std=cfg.initializer_range)
        if cfg.position == "learned":
            self.wpe = param(rngs, (cfg.max_position_embeddings, D), ("positions", "embed"), dt,
                             std=cfg.initializer_range)
        self.layers = Blocks(cfg, rngs)
        self.final_norm = Norm(D, kind=cfg.norm, dtype=dt)
        if cfg.lm_head and not cfg.tie_word_embeddings:
            self.lm_head = Linear((D,), (cfg.vocab_size,), ("embed",), ("vocab",), bias=False, dtype=dt,
                                  rngs=rngs, std=cfg.initializer_range,
                                  lora_rank=cfg.lora_rank if "lm_head" in cfg.lora_targets else 0)
        if cfg.num_labels:
            self.score = Linear((D,), (cfg.num_labels,), ("embed",), ("labels",), bias=False, dtype=dt,
                                rngs=rngs, std=cfg.initializer_range)

    def _weights(self, module):
        return prepare_weights(nnx.to_pure_dict(nnx.state(module)), self.config.compute_dtype, self.config.lora_scale)

    def _layer_weights(self, p, layer):
        """One layer's weights for compute (inside the scan), with this layer's LoRA dropout key."""
        p = prepare_weights(p, self.config.compute_dtype, self.config.lora_scale)
        dropout = current_lora_dropout()  # (rate, key) inside the train step's layers.lora_dropout context
        if dropout is not None:
            rate, key = dropout
            key = jax.random.fold_in(key, layer)
            p = {k: {**v, "lora_dropout": (rate, jax.random.fold_in(key, i))} if "lora_a" in v else v
                 for i, (k, v) in enumerate(sorted(p.items()))}
        return p

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
                      cache: Optional[KVCache] = None):
        """Final-normed hidden states [B, T, D] (and the updated cache when one is given)."""
        cfg = self.config
        B, T = input_ids.shape
        if cache is not None and (segment_ids is not None or T > cache.mask.shape[1]):
            raise ValueError("with a KV cache: no segment_ids, and at most max_len tokens per call")
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            offset = None if cache is None else jnp.sum(cache.mask, axis=1, dtype=jnp.int32)
            positions = default_positions(attention_mask, segment_ids, offset)

        x = jnp.take(self.embed[...].astype(cfg.compute_dtype), input_ids, axis=0)
        if cfg.position == "learned":
            x = x + jnp.take(self.wpe[...].astype(cfg.compute_dtype), positions, axis=0)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        rope = None
        if cfg.position == "rope":
            rope = rope_tables(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_parameters))

        if cache is None and cfg.attention_impl == "splash":
            mask, dist, index = splash.segments(attention_mask, segment_ids), None, None
        elif cache is None:
            slots = jnp.arange(T)
            mask, dist = make_mask(slots, slots, attention_mask, segment_ids, segment_ids)
            index = None
        else:
            index = cache.index
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask, index, axis=1)
            mask, dist = make_mask(index + jnp.arange(T), jnp.arange(cache.mask.shape[1]), key_valid)
        windows = jnp.asarray(np.asarray(cfg.layer_windows or (0,) * cfg.num_layers, np.int32))

        weights = nnx.to_pure_dict(nnx.state(self.layers))
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        if cache is None:
            def body(x, xs):
                p, window, layer = xs
                return block(cfg, self._layer_weights(p, layer), x, rope, mask, dist, window)[0], None

            if cfg.remat != "none":
                body = jax.checkpoint(body, policy=REMAT[cfg.remat], prevent_cse=False)
            x, _ = jax.lax.scan(body, x, (weights, windows, layers))
            return norm(self._weights(self.final_norm), x, cfg.norm, cfg.norm_eps)

        # Decoding: the cache rides in the carry and each layer writes its new slots in place (as xs/ys the
        # scan would copy the whole cache into a fresh stacked output at every step).
        def cached_body(carry, xs):
            x, K, V = carry
            p, window, layer = xs
            x, (K, V) = block(cfg, self._layer_weights(p, layer), x, rope, mask, dist, window, (K, V, layer), index)
            return (x, K, V), None

        (x, K, V), _ = jax.lax.scan(cached_body, (x, cache.k, cache.v), (weights, windows, layers))
        x = norm(self._weights(self.final_norm), x, cfg.norm, cfg.norm_eps)
        return x, KVCache(K, V, key_valid, index + T)

    def head_kernel(self):
        """The [D, V] output projection (the transposed embedding when tied), in compute dtype."""
        if not self.config.lm_head:
            raise ValueError("this model has no LM head (it was built as a reward/value model)")
        if self.config.tie_word_embeddings:
            return self.embed[...].astype(self.config.compute_dtype).T
        p = self._weights(self.lm_head)
        if "lora_a" in p:  # merged: the head is used as one [D, V] matrix by the chunked log-probs
            return p["kernel"] + p["lora_a"] @ p["lora_b"]
        return p["kernel"]

    def logits(self, hidden):
        out = hidden @ self.head_kernel()
        return constrain(out, ("act_batch", "act_length", "act_vocab"))

    def scores(self, hidden):
        """Scalar head at every position: [B, T] (float32). Read it where you need (e.g. the last token)."""
        out = dense(self._weights(self.score), hidden).astype(jnp.float32)
        return out[..., 0] if self.config.num_labels == 1 else out

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, cache=None):
        """Logits [B, T, V]; with a cache, (logits, new_cache)."""
        out = self.hidden_states(input_ids, attention_mask, positions=positions, segment_ids=segment_ids,
                                 cache=cache)
        if cache is None:
            return self.logits(out)
        return self.logits(out[0]), out[1]
