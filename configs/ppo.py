"""PPO with a critic from an SFT model and a reward model (ColossalChat / OpenRLHF style; TRL PPOConfig
defaults: kl_coef 0.05 with k1, clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95, whitened
advantages). The critic starts from the reward model unless ppo.critic_path says otherwise; the reward
model may be a jaxalign RM run or an HF *ForSequenceClassification directory. Optional ptx: SFT records in
ppo.ptx_files mixed in with ppo.ptx_coef. train.batch_size counts prompts per collect step.

jaxalign train --config configs/ppo.py --config.model.path=SFT_DIR --config.ppo.reward_model=RM_DIR \
    --config.data.train_files=prompts.jsonl
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "ppo"
    c.run_dir = "runs/ppo"
    c.model = dict(path="", dtype="bfloat16", param_dtype="float32", remat="dots")
    c.data = dict(train_files="", eval_files="", max_length=1024, max_prompt_length=512)
    c.ppo = dict(reward_model="", max_completion_length=512, temperature=1.0, kl_coef=0.05, kl_estimator="k1",
                 clip_eps=0.2, value_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, reward_clip=10.0,
                 critic_lr=9e-6, num_collect_steps=4, ppo_epochs=1)
    c.optim = dict(lr=1e-6, schedule="constant", warmup_steps=10, weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=400, batch_size=32, micro_batch_size=4, eval_every=40, log_every=1)
    c.checkpoint = dict(every=40, max_to_keep=2, export_hf=True)
    return c
