"""GRPO from an SFT model on prompt records with verifiable rewards (TRL GRPOConfig defaults: G 8,
temperature 1, beta 0 (no reference loaded), epsilon 0.2, group-scaled advantages, global token mean).
Dr. GRPO: --config.grpo.scale_rewards=none --config.grpo.aggregation=dr_grpo; RLOO: grpo.estimator=rloo;
REINFORCE++-baseline: grpo.estimator=reinforce++. train.batch_size counts prompts.

Reward functions are named as module:function (or file.py:function) and get (prompts, completions, and
each extra field of the records as a keyword list); jaxalign.rewards has exact_match (an `answer` field).
A reward model (grpo.reward_model: a jaxalign RM or an HF *ForSequenceClassification directory) can score
the completions too, weighted by grpo.reward_model_weight.

jaxalign train --config configs/grpo.py --config.model.path=SFT_DIR --config.data.train_files=prompts.jsonl \
    --config.grpo.reward_funcs=jaxalign.rewards:exact_match
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "grpo"
    c.run_dir = "runs/grpo"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=512, max_prompt_length=256)
    c.grpo = dict(num_generations=8, max_completion_length=256, temperature=1.0, beta=0.0, epsilon=0.2,
                  estimator="grpo", scale_rewards="group", aggregation="token_mean", num_iterations=1,
                  reward_funcs="jaxalign.rewards:exact_match")
    c.optim = dict(lr=1e-6, schedule="constant", warmup_steps=10, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=500, batch_size=32, micro_batch_size=4, eval_every=50, log_every=1)
    c.checkpoint = dict(every=50, max_to_keep=2, export_hf=True)
    return c
