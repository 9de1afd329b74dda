"""Supervised fine-tuning of a chat model on conversation or Alpaca data.

jaxalign train --config configs/sft.py --config.model.path=HF_DIR --config.data.train_files=data.jsonl
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.run_dir = "runs/sft"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=2048, packing=True)
    c.optim = dict(lr=2e-5, schedule="cosine", warmup_steps=50, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=64, micro_batch_size=8, eval_every=200, log_every=10)
    c.checkpoint = dict(every=200, max_to_keep=2, export_hf=True)
    return c
