"""KTO on unpaired data (prompt, completion, label): desirable/undesirable weights, the KL reference point
from mismatched pairs over the global batch (Ethayarajh et al. 2024; TRL KTOTrainer defaults). Keep the
global batch large (>= 32): the KL estimate is a batch mean. When one kind is rarer, raise its weight so
desirable_weight * n_desirable / (undesirable_weight * n_undesirable) lies in [1, 4/3].

jaxalign train --config configs/kto.py --config.model.path=SFT_DIR --config.data.train_files=unpaired.jsonl
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "kto"
    c.run_dir = "runs/kto"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=2048)
    c.kto = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    c.optim = dict(lr=5e-7, schedule="cosine", warmup_steps=30, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=64, micro_batch_size=4, eval_every=200, log_every=10)
    c.checkpoint = dict(every=200, max_to_keep=2, export_hf=True)
    return c
