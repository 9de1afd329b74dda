"""Quickstart stage 1: SFT of a tiny LLaMA, from scratch, on the bundled digit-sorting task.

Run by `jaxalign quickstart`, or on its own: jaxalign train --config jaxalign/recipes/quickstart/sft.py
"""
import os

import ml_collections

import jaxalign

ASSETS = os.path.join(os.path.dirname(jaxalign.__file__), "assets", "quickstart")


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.run_dir = "runs/quickstart/sft"
    c.model = dict(preset="tiny", dtype="float32", param_dtype="float32")
    c.tokenizer = dict(path=ASSETS)
    c.data = dict(train_files=os.path.join(ASSETS, "sft_train.jsonl"),
                  eval_files=os.path.join(ASSETS, "sft_eval.jsonl"), max_length=64, buckets=(48, 64))
    c.optim = dict(lr=3e-3, schedule="cosine", warmup_steps=30, weight_decay=0.01, clip_norm=1.0)
    c.train = dict(steps=600, batch_size=64, eval_every=300, log_every=50, eval_before=True)
    c.checkpoint = dict(every=300, max_to_keep=1, export_hf=True)
    return c
