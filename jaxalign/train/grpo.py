"""GRPO family (`task="grpo"`) on the generic loop: GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline.

Each step takes train.batch_size prompts, samples grpo.num_generations completions of each with the
sampler on the live policy params (same arrays, same mesh), scores them with the reward functions
(`grpo.reward_funcs`, weighted sum), turns rewards into sequence advantages (`grpo.estimator`,
`grpo.scale_rewards`) and takes one optimizer step on the clipped surrogate (+ beta * k3 KL to the
reference when beta > 0; beta = 0 loads no reference). With num_iterations = mu > 1 the same generations
serve mu steps; their old log-probs (mu > 1) and reference log-probs (beta > 0) are computed once per
generation round, in one pass, and ride in the batch. Checkpoints fall on round boundaries.

Log-probs in the loss divide the logits by the sampling temperature (the sampler's own log-probs are of
that distribution too). Rows are prompt-major (the G samples of a prompt are adjacent). Randomness is
keyed by (seed, step, prompt index, sample), so a resumed run draws the same generations.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import JaxalignError, lora
from jaxalign.losses import policy as P
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.parallel import multihost
from jaxalign.rewards import load_reward_funcs
from jaxalign.train.rl import FrozenRewardModel, PolicySampler, host_means, score_completions, token_logps
from jaxalign.train.run import reference_params
from jaxalign.train.sft import completion_logprobs
from jaxalign.train.task import Memory, Task, register

def check_config(cfg):
    c = cfg.grpo
    if c.num_generations < 1 or (c.estimator == "rloo" and c.num_generations < 2):
        raise JaxalignError(f"grpo.num_generations={c.num_generations}: needs >= 1 (>= 2 for rloo)")
    for field, value, allowed in (("estimator", c.estimator, P.ESTIMATORS),
                                  ("scale_rewards", c.scale_rewards, P.SCALES),
                                  ("aggregation", c.aggregation, P.AGGREGATIONS),
                                  ("kl_estimator", c.kl_estimator, ("k1", "k3"))):
        if value not in allowed:
            raise JaxalignError(f"grpo.{field}={value!r}: expected one of {allowed}")
    mu = c.num_iterations
    if mu < 1 or cfg.train.steps % mu or (cfg.checkpoint.every and cfg.checkpoint.every % mu):
        raise JaxalignError(f"grpo.num_iterations={mu}: train.steps and checkpoint.every must be multiples of it "
                            "(checkpoints fall between generation rounds)")
    if c.temperature <= 0:
        raise JaxalignError("grpo.temperature must be > 0 (the policy gradient needs samples)")


def grpo_loss(model, batch, rng, cfg, aux):
    c = cfg.grpo
    logp, stats, mask = completion_logprobs(model, batch, cfg, temperature=c.temperature)
    old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
    total, denom, metrics = P.policy_loss_sums(logp, old, batch["advantages"], mask, clip_eps=c.epsilon,
                                               clip_eps_high=c.epsilon_high or None,
                                               ref_logps=batch.get("ref_logps"), kl_coef=c.beta,
                                               kl_estimator=c.kl_estimator, aggregation=c.aggregation,
                                               max_len=c.max_completion_length)  # + kl, clip_ratio
    tokens = jnp.sum(mask)
    metrics = {**metrics,
               "entropy": (jnp.sum(stats["entropy"] * mask), tokens)}
    return total, denom, metrics


class Rollout:
    """Generation, scoring and advantages on the host side of each step (the task's rollout)."""

    def __init__(self, run):
        cfg, c = run.cfg, run.cfg.grpo
        self.cfg, self.run = cfg, run
        self.sampler = PolicySampler(run, c, run.graphdef)
        self.funcs = load_reward_funcs(c.reward_funcs, c.reward_weights, required=not c.reward_model)
        self.rm = FrozenRewardModel(run, c.reward_model, "grpo.reward_model") if c.reward_model else None
        self.ref = reference_params(run, c.ref_path or None) if c.beta else None  # beta = 0: no reference
        self.G = c.num_generations
        self.cached = None
        graphdef, model_cfg, T = run.graphdef, run.model_cfg, c.temperature
        self._frozen_logps = jax.jit(lambda policy, ref, batch: {
            **({"old_logps": token_logps(graphdef, policy, batch, cfg, T)} if policy is not None else {}),
            **({"ref_logps": token_logps(lora.reference_graphdef(model_cfg, ref), ref, batch, cfg, T)}
               if ref is not None else {})})

    def score(self, host, texts, G, rows=None):
        return score_completions(self.funcs, self.rm, self.cfg.grpo.reward_model_weight, host, texts, G, rows)

    def state(self) -> dict:
        return {}

    def restore(self, state: dict):
        pass

    def __call__(self, it, params, step):
        if self.cached is not None and step % self.cfg.grpo.num_iterations:
            return self.cached
        self.cached = self.rollout(next(it), params, step)
        return self.cached

    def rollout(self, host, params, step):
        """(batch, metrics): generations, rewards and advantages of one batch of prompts."""
        c = self.cfg.grpo
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), step)
        gen = self.sampler.generate(host, params, self.G, key)
        rows = gen.sequences(c.mask_truncated_completions)
        rewards, each = self.score(host, gen.texts, self.G, rows)
        ok = ~np.isnan(rewards)
        # groups are whole within a process, but batch-scaled and reinforce++ statistics span all processes
        everyone = multihost.allgather(np.nan_to_num(rewards))
        adv = multihost.local_rows(np.asarray(P.group_advantages(everyone, self.G, scale=c.scale_rewards,
                                                                 estimator=c.estimator)), len(rewards))
        batch = {**rows, "advantages": np.where(ok, adv, 0.0).astype(np.float32)}
        if c.num_iterations > 1 or self.ref is not None:  # once per generation round, one pass
            dev = mesh_lib.shard_batch(rows, self.sampler.mesh, self.sampler.rules)
            with jax.set_mesh(self.sampler.mesh):
                out = self._frozen_logps(params if c.num_iterations > 1 else None, self.ref, dev)
            batch.update({k: self.sampler.local(v, len(rewards)) for k, v in out.items()})
        r = np.nan_to_num(rewards)
        columns = {"reward": r, "reward_sq": r ** 2, "completions/mean_length": gen.lengths,
                   "completions/clipped_ratio": ~gen.stopped,
                   "frac_reward_zero_std": np.repeat(r.reshape(-1, self.G).std(1) == 0, self.G),
                   **{f"rewards/{name}": np.nan_to_num(v) for name, v in each.items()}}
        return batch, host_means(columns, np.repeat(host["weight"], self.G))

    def evaluate(self, params, data) -> dict:
        """Rewards of one completion per held-out prompt (greedy by default)."""
        def columns(host, gen):
            rewards, each = self.score(host, gen.texts, 1, gen.sequences())
            return {"reward": rewards, **{f"rewards/{k}": v for k, v in each.items()}}
        return self.sampler.evaluate(params, data, columns)


# Names and defaults as TRL's GRPOConfig. train.batch_size counts prompts, each sampled num_generations times.
TASK = register(Task(
    "grpo", "prompt", grpo_loss, check=check_config, rollout=Rollout,
    defaults=dict(num_generations=8, max_completion_length=256, temperature=1.0, beta=0.0, kl_estimator="k3",
                  epsilon=0.2, epsilon_high=0.0, estimator="grpo", scale_rewards="group",
                  aggregation="token_mean", num_iterations=1, reward_funcs="", reward_weights="", ref_path="",
                  mask_truncated_completions=False, eval_temperature=0.0, reward_model="",
                  reward_model_weight=1.0),
    memory=Memory(sequences_per_row=lambda cfg: cfg.grpo.num_generations, reference=lambda cfg: bool(cfg.grpo.beta))))
