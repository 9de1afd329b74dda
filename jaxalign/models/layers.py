"""Building blocks shared by every decoder: parameter containers, norms, RoPE, attention, MLP, KV cache.

Parameters live in small NNX modules (containers with logical-axis metadata); the math is plain functions
over arrays so the layer stack can run under `jax.lax.scan` on a pure dict of stacked weights.
"""
import contextlib
import contextvars
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.parallel.mesh import constrain


def param(rngs: Optional[nnx.Rngs], shape, axes, dtype, init="normal", std=0.02) -> nnx.Param:
    """An nnx.Param with logical axes; sharding is applied by the caller (no mesh needed to build)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "uniform":  # U(-std, std)
        value = jax.random.uniform(rngs.params(), shape, dtype, -std, std)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """kernel[*lead, *in, *out] (+ bias[*lead, *out]); `lead` is the stacked-layers dim when present.

    lora_rank > 0 adds adapters lora_a[*lead, *in, r] (U(-1/sqrt(in), 1/sqrt(in)), as PEFT's kaiming init)
    and lora_b[*lead, r, *out] (zeros, so the adapted model starts as the base), sharded along their base
    weight's axes. `quantized`: an int8 kernel with a float32 scale per output channel (kernel_scale)."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, bias, dtype, rngs, std=0.02, layers=None,
                 lora_rank=0, quantized=False):
        lead, lead_axes = ((layers,), ("layers",)) if layers else ((), ())
        shape, axes = lead + tuple(in_shape) + tuple(out_shape), lead_axes + tuple(in_axes) + tuple(out_axes)
        if quantized:
            self.kernel = param(None, shape, axes, jnp.int8, init="zeros")
            self.kernel_scale = param(None, lead + tuple(out_shape), lead_axes + tuple(out_axes), jnp.float32,
                                      init="ones")
        else:
            self.kernel = param(rngs, shape, axes, dtype, std=std)
        if bias:
            self.bias = param(rngs, lead + tuple(out_shape), lead_axes + tuple(out_axes), dtype, init="zeros")
        if lora_rank:
            n_in = math.prod(in_shape)
            self.lora_a = param(rngs, lead + tuple(in_shape) + (lora_rank,), lead_axes + tuple(in_axes) + (None,),
                                dtype, init="uniform", std=1.0 / math.sqrt(n_in))
            self.lora_b = param(None, lead + (lora_rank,) + tuple(out_shape), lead_axes + (None,) + tuple(out_axes),
                                dtype, init="zeros")


class Norm(nnx.Module):
    def __init__(self, size, *, kind, dtype, layers=None):
        lead, lead_axes = ((layers,), ("layers",)) if layers else ((), ())
        self.scale = param(None, lead + (size,), lead_axes + ("embed",), dtype, init="ones")
        if kind == "layer":
            self.bias = param(None, lead + (size,), lead_axes + ("embed",), dtype, init="zeros")


# ---------------------------------------------------------------------------------------------- math

def norm(p: dict, x, kind: str, eps: float):
    """RMSNorm (LLaMA) or LayerNorm (GPT-2), statistics in float32, as HF computes them."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    if kind == "rms":
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return p["scale"] * y.astype(dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(dtype)


def _matmul(x, k, contract: int):
    """x[..., *in] @ k[*in, *out] as one 2-D matmul [M, in] @ [in, out] (M = the flattened leading dims).
    XLA:CPU lays out the backward's weight-gradient dots badly for 3-D operands (a transposed copy of
    every activation gradient, fused with its elementwise producer: ~1.5x slower train steps); 2-D operands
    keep the plain layout. Merging the batch-major leading dims keeps their sharding (batch is the major one)."""
    lead, ins, outs = x.shape[:-contract], k.shape[:contract], k.shape[contract:]
    y = x.reshape(-1, math.prod(ins)) @ k.reshape(math.prod(ins), math.prod(outs))
    return y.reshape(*lead, *outs)


_LORA_DROPOUT = contextvars.ContextVar("jaxalign_lora_dropout", default=None)


@contextlib.contextmanager
def lora_dropout(rate: float, key):
    """LoRA dropout (rate, PRNG key) for the models traced inside this context: the train step's forward only
    (a context, like the sharding rules, so the model objects stay untouched)."""
    token = _LORA_DROPOUT.set((rate, key) if rate else None)
    try:
        yield
    finally:
        _LORA_DROPOUT.reset(token)


def current_lora_dropout():
    return _LORA_DROPOUT.get()


def dense(p: dict, x, contract: int = 1):
    """x[..., *in] @ kernel[*in, *out] (+ bias); `contract` = number of input dims of the kernel.
    With LoRA adapters (lora_b already multiplied by alpha/r, see `prepare_weights`): + (x A) B.
    Dropout on the adapters' input, when `p` carries a `lora_dropout` (rate, key) pair."""
    y = _matmul(x, p["kernel"], contract)
    if "lora_a" in p:
        xa = x
        if "lora_dropout" in p:
            rate, key = p["lora_dropout"]
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            xa = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        y = y + _matmul(_matmul(xa, p["lora_a"], contract), p["lora_b"], 1)
    return y + p["bias"] if "bias" in p else y


def prepare_weights(p: dict, dtype, lora_scale: float = 0.0):
    """One module's (or one layer's) weights for compute: cast to `dtype`, int8 kernels dequantised with their
    per-channel scale, LoRA's alpha/r folded into lora_b (r x out, cheap). Done per layer inside the scan so
    a low-precision frozen stack is never materialised whole in compute precision."""
    if not isinstance(p, dict):
        return p.astype(dtype)
    out = {}
    for name, v in p.items():
        if name == "kernel_scale":
            continue
        if isinstance(v, dict):
            out[name] = prepare_weights(v, dtype, lora_scale)
        elif name == "kernel" and "kernel_scale" in p:
            out[name] = (v.astype(jnp.float32) * p["kernel_scale"]).astype(dtype)
        elif name == "lora_b":
            out[name] = (v.astype(jnp.float32) * lora_scale).astype(dtype)
        else:
            out[name] = v.astype(dtype)
    return out


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def mlp(p: dict, x, activation: str, gated: bool):
    act = ACTIVATIONS[activation]
    h = act(dense(p["gate"], x)) * dense(p["up"], x) if gated else act(dense(p["up"], x))
    h = constrain(h, ("act_batch", "act_length", "act_heads"))
    return dense(p["down"], h)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """Inverse frequencies, with HF's `linear` and `llama3` rope scaling (float32, as HF computes them)."""
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv = inv.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = np.float32(scaling["factor"])
        low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
        old_len = np.float32(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = np.float32(2 * math.pi) / inv
        out = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


def rope_tables(positions, inv_freq):
    """cos, sin of shape [B, T, head_dim] (HF's concatenated-halves layout), float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, N, Dh]; rotate_half convention (HF LLaMA checkpoints are already permuted for it)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


# --------------------------------------------------------------------------------------- attention

class KVCache(NamedTuple):
    """Decoding cache for all layers: k, v [L, B, K, S, Dh] (slots next to each other per kv head, the layout the
    decode step's attention dots read without a transposed copy); `mask` [B, S] marks slots holding real tokens;
    `index` is the next slot to write (the same for every row: prompts are left-padded).

    The caller (the sampler) keeps `index + new tokens <= max_len`: under jit the index is traced and
    a write past the end cannot raise; it would overwrite the last slot."""
    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config, batch: int, max_len: int, dtype=None):
        dtype = dtype or config.compute_dtype
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
                   jnp.zeros((), jnp.int32))


def make_mask(q_slots, k_slots, key_valid, q_segments=None, k_segments=None):
    """Boolean [B, 1, T, S]: causal over slots, keys must be real tokens, same segment when packed.
    Also returns the slot distance q - k ([T, S]) for sliding windows."""
    dist = q_slots[:, None] - k_slots[None, :]
    mask = (dist >= 0)[None] & key_valid[:, None, :]
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    return mask[:, None], dist


def windowed(mask, dist, window):
    """mask [B,1,T,S] limited to keys less than `window` slots back (0 = no window)."""
    return mask & ((window == 0) | (dist < window))[None, None]


def attention(q, k, v, mask, dist, window, impl=None):
    """q [B,T,N,Dh], k/v [B,S,K,Dh] (grouped-query: N a multiple of K), mask [B,1,T,S]; window 0 = full."""
    mask = windowed(mask, dist, window)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]),
                                       implementation=impl)
    return out


def cached_attention(q, k, v, mask, dist, window):
    """Attention over a KV cache: q [B,T,N,Dh], k/v [B,K,S,Dh] (the cache's layout), mask [B,1,T,S]. The same
    arithmetic as jax.nn.dot_product_attention's XLA path (float32 logits and softmax, masked logits at the
    dtype's minimum), written for this layout: on CPU the decode step's attention is ~3x faster than
    transposing the cache to [B,S,K,Dh] for the library call."""
    B, T, N, H = q.shape
    K = k.shape[1]
    mask = windowed(mask, dist, window)
    qg = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(H)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(B, T, N, H)
