"""Quickstart stage 3: DPO from the SFT model on its own mistakes; the reference is the SFT model.

The pairs are on-policy: `jaxalign quickstart` samples 4 completions per training prompt from the SFT model
at temperature 1 and pairs each prompt's reference answer (chosen) with one of its wrong samples (rejected),
then sets data.train_files to them. The NLL term on the chosen answer (sft_coef, as iterative RPO, Pang et
al. 2024) keeps the chosen likelihood from falling with the rejected one: without it, DPO on pairs this
similar (one digit apart) lowers both and exact match drops. Eval: the bundled held-out pairs.

On its own: jaxalign train --config jaxalign/recipes/quickstart/dpo.py --config.model.path=runs/quickstart/sft \
    --config.data.train_files=runs/quickstart/dpo_pairs.jsonl
"""
import os

import ml_collections

import jaxalign

ASSETS = os.path.join(os.path.dirname(jaxalign.__file__), "assets", "quickstart")


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "dpo"
    c.run_dir = "runs/quickstart/dpo"
    c.model = dict(path="runs/quickstart/sft", dtype="float32", param_dtype="float32")
    c.tokenizer = dict(path=ASSETS)
    c.data = dict(train_files="runs/quickstart/dpo_pairs.jsonl", eval_files=os.path.join(ASSETS, "pref_eval.jsonl"),
                  max_length=64, buckets=(48, 64))
    c.dpo = dict(beta=0.1, loss_type="sigmoid", sft_coef=1.0, precompute_ref_logps=True)
    c.optim = dict(lr=3e-4, schedule="cosine", warmup_steps=10, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=300, batch_size=32, eval_every=150, log_every=50, eval_before=True)
    c.checkpoint = dict(every=300, max_to_keep=1, export_hf=True)
    return c
