"""SimPO: reference-free, length-averaged log-probs with a target margin (Meng et al. 2024; beta 2.0,
gamma 0.5 as TRL's CPOTrainer loss_type="simpo"; the paper tunes beta in 2-10, gamma/beta in 0.3-0.5).

jaxalign train --config configs/simpo.py --config.model.path=SFT_DIR --config.data.train_files=pairs.jsonl
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "simpo"
    c.run_dir = "runs/simpo"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=2048)
    c.simpo = dict(beta=2.0, gamma=0.5, label_smoothing=0.0)
    c.optim = dict(lr=5e-7, schedule="cosine", warmup_steps=30, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=128, micro_batch_size=4, eval_every=200, log_every=10)
    c.checkpoint = dict(every=200, max_to_keep=2, export_hf=True)
    return c
