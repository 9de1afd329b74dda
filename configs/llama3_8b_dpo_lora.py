"""DPO of a Llama 3.1 8B SFT model with LoRA on one 24 GB GPU (or 16 GB with an int8 base).

LoRA rank 16, alpha 32 on every attention and MLP projection (42M adapter parameters, 0.5%); the frozen base
in bf16 is also the DPO reference (on the fly: no second copy, nothing precomputed). Per-device memory
(`--dry-run` prints it; jaxalign/train/memory.py), mesh (1, 1, 1), micro-batch 2 pairs of 2048 tokens,
remat "full":
  base 14.96 GiB (bf16)  + adapters 0.16 + grads 0.16 + AdamW 0.31 + activations 2.0 + logits 0.5 = ~18.1 GiB
  base  8.46 GiB (int8: --config.lora.base_dtype=int8)                                            = ~11.6 GiB
Full fine-tuning of the same model needs ~152 GiB (fp32 weights, grads, AdamW and a reference copy).
Export: run_dir/hf holds the merged model, run_dir/adapter the PEFT adapter (peft.PeftModel.from_pretrained).
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "dpo"
    c.run_dir = "runs/llama3_8b_dpo_lora"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="full")
    c.data = dict(train_files="", eval_files="", max_length=2048, max_prompt_length=1024)
    c.mesh = dict(shape=(1, 1, 1))
    c.lora = dict(rank=16, alpha=32.0, dropout=0.05, targets=r"layers/(q|k|v|o|gate|up|down)/kernel",
                  base_dtype="bfloat16")
    c.dpo = dict(beta=0.1, loss_type="sigmoid", precompute_ref_logps=False)
    c.optim = dict(lr=5e-6, schedule="cosine", warmup_steps=30, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=32, micro_batch_size=2, eval_every=100, log_every=10)
    c.checkpoint = dict(every=100, max_to_keep=2, export_hf=True)
    return c
