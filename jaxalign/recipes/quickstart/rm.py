"""Quickstart stage 2: a reward model from the SFT model, on bundled pairs (a correct sort vs a mistake).

jaxalign quickstart sets model.path to the stage-1 run; on its own:
jaxalign train --config jaxalign/recipes/quickstart/rm.py --config.model.path=runs/quickstart/sft
"""
import os

import ml_collections

import jaxalign

ASSETS = os.path.join(os.path.dirname(jaxalign.__file__), "assets", "quickstart")


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "rm"
    c.run_dir = "runs/quickstart/rm"
    c.model = dict(path="runs/quickstart/sft", dtype="float32", param_dtype="float32")
    c.tokenizer = dict(path=ASSETS)
    c.data = dict(train_files=os.path.join(ASSETS, "pref_train.jsonl"),
                  eval_files=os.path.join(ASSETS, "pref_eval.jsonl"), max_length=64, buckets=(48, 64))
    c.optim = dict(lr=1e-3, schedule="cosine", warmup_steps=20, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=500, batch_size=32, eval_every=250, log_every=25, eval_before=True)
    c.checkpoint = dict(every=500, max_to_keep=1, export_hf=True)
    return c
