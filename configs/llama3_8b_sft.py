"""SFT of Llama 3.1 8B (HF checkpoint) at 4k tokens, packed: 2 nodes x 8 H100 80GB, or a TPU v5p-64 slice.

Per-device memory (jaxalign/train/memory.py; `jaxalign train --config configs/llama3_8b_sft.py --dry-run`
prints it and, with the devices present, compiles the step): 8.03B params in float32 master weights
(bf16 compute), FSDP over every device, remat "dots", one 4096-token row per device per micro-batch.
  2 x 8 H100, mesh (1, 16, 1), micro 16:  params 1.9 + grads 1.9 + AdamW 3.7 + activations 14.5
                                         + logits chunk 0.1 = ~22 GiB of 80
  v5p-64 (32 chips), mesh (1, 32, 1), micro 32 (--config.mesh.shape="(1,32,1)"
  --config.train.micro_batch_size=32): 0.9 + 0.9 + 1.9 + 14.5 + 0.1 = ~18 GiB of 95
Global batch 64 rows x 4096 tokens = 262k tokens per step (4 accumulation steps on 16 devices).
Attention kernel: add --config.model.attention_impl=cudnn on GPU (compiled for 16 H100s with
--config.runtime.dry_run_target=h100x16 and unpacked 4096-token rows, the step needs 26.8 GiB per device
against 37.5 GiB with XLA's attention, which keeps the [T, S] scores), or =splash on TPU.

Launch: launch/gpu_slurm.sh (2 nodes) or launch/tpu_pod.sh; model.path is the HF directory on every host.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.run_dir = "runs/llama3_8b_sft"
    c.model = dict(path="", preset="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=4096, packing=True)
    c.mesh = dict(shape=(1, 16, 1))
    c.optim = dict(lr=2e-5, schedule="cosine", warmup_steps=50, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=2000, batch_size=64, micro_batch_size=16, eval_every=200, log_every=10)
    c.checkpoint = dict(every=200, max_to_keep=2, export_hf=True)
    return c
