"""DPO of a Llama 3.1 70B SFT model at 2k tokens: a TPU v5p-128 slice (64 chips) in float32 master weights,
or 2 nodes x 8 H100 80GB in bfloat16 weights.

Per-device memory (`--dry-run`; jaxalign/train/memory.py), FSDP over every device, remat "full":
  v5p-128, mesh (1, 64, 1), micro 64, float32 weights, reference on the fly:
      params 4.1 + grads 4.1 + AdamW 8.2 + reference 4.1 + activations 5.0 + logits 0.2 = ~26 GiB of 95
  2 x 8 H100, mesh (1, 16, 1), micro 16 (--config.mesh.shape="(1,16,1)" --config.train.micro_batch_size=16
  --config.model.param_dtype=bfloat16), reference precomputed:
      8.2 + 8.2 + 16.4 + activations 5.0 + logits 0.2 = ~38 GiB of 80 (46 with the reference on the fly).
      float32 weights would need 4 x 282 GB / 16 = 70 GiB before activations: they do not fit there.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "dpo"
    c.run_dir = "runs/llama3_70b_dpo"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="full")
    c.data = dict(train_files="", eval_files="", max_length=2048, max_prompt_length=1024)
    c.mesh = dict(shape=(1, 64, 1))
    c.dpo = dict(beta=0.1, loss_type="sigmoid", precompute_ref_logps=False)
    c.optim = dict(lr=5e-7, schedule="cosine", warmup_steps=30, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=128, micro_batch_size=64, eval_every=100, log_every=10)
    c.checkpoint = dict(every=100, max_to_keep=2, export_hf=True)
    return c
