"""ORPO: SFT and preference in one stage, no reference model (Hong et al. 2024; lambda 0.1 as TRL's beta,
lr 8e-6 as the paper's Mistral runs). Starts from a base model.

jaxalign train --config configs/orpo.py --config.model.path=BASE_DIR --config.data.train_files=pairs.jsonl
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "orpo"
    c.run_dir = "runs/orpo"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=2048)
    c.orpo = dict(lam=0.1)
    c.optim = dict(lr=8e-6, schedule="linear", warmup_steps=100, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=64, micro_batch_size=4, eval_every=200, log_every=10)
    c.checkpoint = dict(every=200, max_to_keep=2, export_hf=True)
    return c
