"""DPO from an SFT model on preference pairs; the reference is the starting model, its log-probs
precomputed once over the data (TRL DPOTrainer defaults: beta 0.1, sigmoid loss, lr 1e-6 range).
Other losses: --config.dpo.loss_type=ipo (or a weighted list, e.g. "sigmoid:0.8,bco_pair:0.2").

jaxalign train --config configs/dpo.py --config.model.path=SFT_DIR --config.data.train_files=pairs.jsonl
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "dpo"
    c.run_dir = "runs/dpo"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=2048)
    c.dpo = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, sft_coef=0.0, precompute_ref_logps=True)
    c.optim = dict(lr=5e-7, schedule="cosine", warmup_steps=30, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=1000, batch_size=64, micro_batch_size=4, eval_every=200, log_every=10)
    c.checkpoint = dict(every=200, max_to_keep=2, export_hf=True)
    return c
