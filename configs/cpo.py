"""CPO: reference-free preference loss plus NLL on the chosen completion (Xu et al. 2024; beta 0.1, alpha
1.0 as TRL's CPOTrainer).

jaxalign train --config configs/cpo.py --config.model.path=SFT_DIR --config.data.train_files=pairs.jsonl
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "cpo"
    c.run_dir = "runs/cpo"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=2048)
    c.cpo = dict(beta=0.1, alpha=1.0)
    c.optim = dict(lr=1e-6, schedule="cosine", warmup_steps=30, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=64, micro_batch_size=4, eval_every=200, log_every=10)
    c.checkpoint = dict(every=200, max_to_keep=2, export_hf=True)
    return c
