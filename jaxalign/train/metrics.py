"""Metric sinks (metrics.jsonl + TensorBoard event files, process 0 only) and throughput arithmetic."""
import json
import os
import time

import jax

# Dense bf16 peak FLOP/s per device (vendor figures), for the MFU estimate; override with train.peak_flops.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def peak_flops(override: float = 0.0):
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def train_flops_per_token(cfg, seq_len: int) -> float:
    """MaxText's MFU numerator: matmul FLOPs of forward + backward (3x forward) per token, causal
    attention counted at half, input embedding lookup not counted."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = D * (q + 2 * kv) + q * D + D * F * (3 if cfg.gated_mlp else 2)
    head = D * V if cfg.lm_head else D * max(cfg.num_labels, 1)
    matmul = 2 * (L * per_layer + head)
    attention = 2 * 2 * L * seq_len * q * 0.5  # QK^T and AV, causal half
    return 3 * (matmul + attention)


class MetricsWriter:
    """Appends one JSON line per logged step (`step`, `time`: unix seconds when written, then the metrics);
    mirrors the metrics to TensorBoard. No-op off process 0."""

    def __init__(self, run_dir: str, resume_step=None):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            self._truncate(resume_step)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _truncate(self, step):
        """Drop lines of steps after the checkpoint we resume from: they will be logged again."""
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict):
        if not self.active:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, float(v), step)

    def close(self):
        if self.active:
            self.tb.close()
