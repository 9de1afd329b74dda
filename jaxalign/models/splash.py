"""Splash attention (the TPU Pallas kernel, `jax.experimental.pallas.ops.tpu.splash_attention`) for training
forwards: `model.attention_impl = "splash"`.

The kernel's mask is static (causal, or a sliding window); padding and packing come in as segment ids: every
real token carries its packed segment's id (1 when unpacked) and every pad token 0, so a real query sees
exactly the keys the dense mask allows (earlier, real, same segment). Pad queries see only pads: their
outputs differ from the dense path's but no loss reads them. Lengths are padded up to the kernel's 128-wide
blocks the same way. The heads are laid out [B, N, T, Dh] for the
kernel, run per batch row (vmap) and, under a mesh, per shard of batch x heads (shard_map), since a Pallas
call is not partitioned by GSPMD. Off TPU it runs in Pallas interpret mode, which is how the CPU tests
check it against the XLA path; on GPU use `cudnn`.
"""
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from jaxalign.parallel.mesh import logical_to_spec

BLOCKS = (512, 256, 128)


def segments(attention_mask, segment_ids=None):
    """[B, T] int32: the packed segment id of each real token (1 when unpacked), 0 for pads."""
    real = segment_ids if segment_ids is not None else jnp.ones(attention_mask.shape, jnp.int32)
    return jnp.where(attention_mask, real, 0).astype(jnp.int32)


def static_window(layer_windows) -> int:
    """The one sliding window every layer shares (0 = none): the kernel's mask is fixed at trace time."""
    windows = set(layer_windows or (0,))
    if len(windows) > 1:
        raise ValueError(f"attention_impl=splash needs one attention window for every layer, got "
                         f"{sorted(windows)} (use attention_impl=xla for per-layer windows)")
    return windows.pop()


def block_size(T: int) -> int:
    """The kernel's query/key block for a length T that is a multiple of 128 (its lane width)."""
    return next(b for b in BLOCKS if T % b == 0)


def _kernel(T: int, N: int, window: int, on_tpu: bool):
    one = sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0) if window else sm.CausalMask((T, T))
    b = block_size(T)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * N), block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=not on_tpu)


def attention(q, k, v, seg, window: int = 0):
    """q [B, T, N, Dh], k/v [B, T, K, Dh], seg [B, T] from `segments`; returns [B, T, N, Dh]."""
    platform = jax.devices()[0].platform
    if platform == "gpu":
        raise ValueError("attention_impl=splash is a TPU kernel; on GPU use attention_impl=cudnn")
    on_tpu = platform == "tpu"
    B, T, N, H = q.shape
    pad = -T % 128  # the kernel works in 128-wide blocks; the padding is segment 0, which no real query sees
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)))
    q = (q / math.sqrt(H)).astype(q.dtype).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    mesh = jax.sharding.get_abstract_mesh()
    sharded = mesh is not None and not mesh.empty
    q_spec = logical_to_spec(("act_batch", "act_heads", None, None), q.shape, mesh if sharded else None)
    kv_spec = logical_to_spec(("act_batch", "act_heads", None, None), k.shape, mesh if sharded else None)
    if sharded and q_spec[1] != kv_spec[1]:  # query heads split over `model`, kv heads not: give each q head its kv
        k, v = (jnp.repeat(x, N // x.shape[1], axis=1) for x in (k, v))
        kv_spec = q_spec

    def run(q, k, v, seg):
        kernel = _kernel(T + pad, q.shape[1], window, on_tpu)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(q, k, v, seg)

    if sharded:
        seg_spec = logical_to_spec(("act_batch", None), seg.shape, mesh)
        run = jax.shard_map(run, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)
    return run(q, k, v, seg).transpose(0, 2, 1, 3)[:, :T]
