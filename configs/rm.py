"""Reward model: a scalar head on an SFT model, Bradley-Terry loss on preference pairs (TRL RewardTrainer,
OpenRLHF train_rm). Exports as HF *ForSequenceClassification with the reward mean/std measured on the eval set.

jaxalign train --config configs/rm.py --config.model.path=SFT_DIR --config.data.train_files=pairs.jsonl
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "rm"
    c.run_dir = "runs/rm"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=2048)
    c.rm = dict(center_coef=0.0, normalize_reward=True)
    c.optim = dict(lr=9e-6, schedule="cosine", warmup_steps=30, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=128, micro_batch_size=4, eval_every=200, log_every=10)
    c.checkpoint = dict(every=200, max_to_keep=2, export_hf=True)
    return c
