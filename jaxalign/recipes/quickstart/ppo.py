"""Quickstart stage 5: PPO from the SFT model with the verifiable reward (ppo.reward_funcs: the digits sorted or not).

The quickstart reward model (stage 2) is not used: it learned "sorted and the right length", not "the prompt's
digits", and RL against it finds answers such as "5 8 8 8 8" that outscore the right sort. The critic starts
from the SFT model with a fresh scalar head; lam=1 (returns minus the critic's value) because the fresh critic
explains little of the return early on. In the quickstart, 800 steps (147 s on 2 CPU cores) take held-out mean
reward 0.770 -> 0.855 and sampled exact match 75.2% -> 83.4% (greedy 95.5% -> 96.0%). The held-out eval
samples at the training temperature (one completion per prompt).
On its own:
jaxalign train --config jaxalign/recipes/quickstart/ppo.py --config.model.path=runs/quickstart/sft
"""
import os

import ml_collections

import jaxalign

ASSETS = os.path.join(os.path.dirname(jaxalign.__file__), "assets", "quickstart")


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "ppo"
    c.run_dir = "runs/quickstart/ppo"
    c.model = dict(path="runs/quickstart/sft", dtype="float32", param_dtype="float32")
    c.tokenizer = dict(path=ASSETS)
    c.data = dict(train_files=os.path.join(ASSETS, "grpo_train.jsonl"),
                  eval_files=os.path.join(ASSETS, "grpo_eval.jsonl"), max_length=32, buckets=(16, 32))
    c.ppo = dict(reward_funcs="jaxalign.rewards:sorted_digits", max_completion_length=16, temperature=1.0,
                 kl_coef=0.05, kl_estimator="k1", lam=1.0, critic_lr=1e-3, num_collect_steps=1, ppo_epochs=1,
                 eval_temperature=1.0)
    c.optim = dict(lr=1e-4, schedule="constant", warmup_steps=5, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=800, batch_size=64, eval_every=400, log_every=50, eval_before=True)
    c.checkpoint = dict(every=800, max_to_keep=1, export_hf=True)
    return c
