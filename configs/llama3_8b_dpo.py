"""DPO of a Llama 3.1 8B SFT model at 2k tokens: 2 nodes x 8 H100 80GB, or a TPU v5p-64 slice.

Per-device memory (`--dry-run` prints it; jaxalign/train/memory.py): float32 master weights, FSDP over
every device, remat "dots", one pair (2 rows of 2048) per device per micro-batch. The reference is
precomputed once over the data by default (no second copy in memory while training); the on-the-fly
reference (--config.dpo.precompute_ref_logps=false) adds one more copy of the weights:
  2 x 8 H100, mesh (1, 16, 1), micro 16: params 1.9 + grads 1.9 + AdamW 3.7 (+ reference 1.9)
                                        + activations 14.5 + logits 0.2 = ~22 (24) GiB of 80
  v5p-64 (32 chips), mesh (1, 32, 1), micro 32: 0.9 + 0.9 + 1.9 (+ 0.9) + 14.5 + 0.2 = ~18 (19) GiB of 95
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "dpo"
    c.run_dir = "runs/llama3_8b_dpo"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=2048, max_prompt_length=1024)
    c.mesh = dict(shape=(1, 16, 1))
    c.dpo = dict(beta=0.1, loss_type="sigmoid", precompute_ref_logps=True)
    c.optim = dict(lr=5e-7, schedule="cosine", warmup_steps=30, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=64, micro_batch_size=16, eval_every=100, log_every=10)
    c.checkpoint = dict(every=100, max_to_keep=2, export_hf=True)
    return c
