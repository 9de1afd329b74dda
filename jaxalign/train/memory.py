"""Per-device memory arithmetic of a training config (what `jaxalign train --dry-run` prints).

Weights shard over fsdp x model (embed over fsdp; heads, mlp and vocab over model; DEFAULT_RULES), so each
device holds about 1/(fsdp*model) of the parameters, their gradients and AdamW's two moments (in the
parameter dtype). A frozen reference (DPO/KTO on the fly, GRPO with beta, PPO) adds one more copy of the
weights; PPO adds a critic with its gradients and moments. With LoRA only the adapters have gradients and
moments, and the frozen base (lora.base_dtype: bf16, or int8 block kernels) doubles as the reference.
Activations are for one micro-batch: rows per device = micro_batch / (data*fsdp) (twice that for pairs), saved per layer as the remat policy keeps them
(full: the layer input; dots: also the matmul outputs; none: roughly everything, Korthikanti et al.'s
~(34 D + 5 H T) bytes per token in half precision), plus one log-prob chunk of [rows, chunk, V] float32.
These are estimates; the compiled program's own numbers (XLA's memory analysis) are printed beside them.
"""
import math

import jax.numpy as jnp

def _mesh(shape, n_devices: int) -> dict:
    shape = list(shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = max(n_devices // known, 1)
    return dict(zip(("data", "fsdp", "model"), shape))


def estimate(cfg, model_cfg, n_devices: int, task) -> dict:
    """Bytes per device by kind (params, grads, optimizer, reference, activations, logits chunk, total), from
    the task's memory figures (train/task.py Memory)."""
    mesh = _mesh(cfg.mesh.shape, n_devices)
    shards = mesh["fsdp"] * mesh["model"]
    pbytes = jnp.dtype(model_cfg.param_dtype).itemsize
    cbytes = jnp.dtype(model_cfg.dtype).itemsize
    n = model_cfg.num_params()
    weights = n * pbytes / shards
    figures = task.memory
    trained = figures.trained_models  # PPO trains a critic of about the same size
    reference = bool(figures.reference(cfg))
    frozen = figures.frozen_models * weights  # PPO: the reward model
    if model_cfg.lora_rank:  # LoRA: the adapters are trained; the frozen base is also the reference
        adapters = lora_params(model_cfg) * pbytes / shards * trained
        out = {"base": base_bytes(model_cfg, cfg.lora.base_dtype) / shards, "params": adapters,
               "grads": adapters, "optimizer": 2 * adapters}
        explicit_ref = task.section(cfg).get("ref_path")
        out["reference"] = (weights if reference and explicit_ref else 0.0) + frozen
    else:
        out = {"base": 0.0, "params": weights * trained, "grads": weights * trained,
               "optimizer": 2 * weights * trained}
        out["reference"] = (weights if reference else 0.0) + frozen
    mb = cfg.train.micro_batch_size or cfg.train.batch_size
    rows = mb / (mesh["data"] * mesh["fsdp"]) * figures.sequences_per_row(cfg)
    T, D, F, L, V = cfg.data.max_length, model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_layers, \
        model_cfg.vocab_size
    per_token_layer = {"full": D, "dots": 4 * D + 3 * F, "none": 17 * D + 2.5 * model_cfg.num_heads * T}
    act = rows * T * L * per_token_layer[model_cfg.remat] * cbytes / (mesh["model"] if model_cfg.remat != "full" else 1)
    out["activations"] = act
    out["logits_chunk"] = rows * min(cfg.train.logprob_chunk, T) * V * 4 / mesh["model"] * 2  # logits + grad
    out["total"] = sum(out.values())
    out["mesh"] = mesh
    out["num_params"] = n
    return out


def lora_params(model_cfg) -> int:
    """Adapter parameter count: r * (n_in + n_out) per adapted Linear (per layer for the block stack)."""
    D, F, V, r = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.vocab_size, model_cfg.lora_rank
    q, kv = model_cfg.num_heads * model_cfg.head_dim, model_cfg.num_kv_heads * model_cfg.head_dim
    sizes = {"layers/q": (D, q), "layers/k": (D, kv), "layers/v": (D, kv), "layers/o": (q, D),
             "layers/gate": (D, F), "layers/up": (D, F), "layers/down": (F, D), "lm_head": (D, V)}
    return sum(r * sum(sizes[t]) * (model_cfg.num_layers if t.startswith("layers/") else 1)
               for t in model_cfg.lora_targets)


def base_bytes(model_cfg, base_dtype: str) -> float:
    """The frozen base's bytes: int8 stores the block Linear kernels in one byte (+ a float32 scale per output
    channel) and the rest (embeddings, norms, head) in bf16."""
    n = model_cfg.num_params()
    if base_dtype != "int8":
        return n * jnp.dtype(base_dtype).itemsize
    L, D, F = model_cfg.num_layers, model_cfg.hidden_size, model_cfg.intermediate_size
    q, kv = model_cfg.num_heads * model_cfg.head_dim, model_cfg.num_kv_heads * model_cfg.head_dim
    kernels = L * (D * (q + 2 * kv) + q * D + D * F * (3 if model_cfg.gated_mlp else 2))
    scales = L * (q + 2 * kv + D + F * (2 if model_cfg.gated_mlp else 1) + D)
    return kernels + 4 * scales + 2 * (n - kernels)


def report(est: dict) -> str:
    gib = lambda b: f"{b / 2**30:8.2f} GiB" if b >= 2**30 else f"{b / 2**20:8.1f} MiB"
    lines = [f"model: {est['num_params'] / 1e9:.2f}B params; mesh {est['mesh']}; per device:"]
    for k in ("base", "params", "grads", "optimizer", "reference", "activations", "logits_chunk", "total"):
        if k == "base" and not est[k]:
            continue
        lines.append(f"  {k:<13}{gib(est[k])}")
    return "\n".join(lines)
