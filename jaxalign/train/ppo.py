"""PPO with a critic (`task="ppo"`), ColossalChat / OpenRLHF style, on the generic loop.

Models: the actor (the policy, trained), the critic (trained: a scalar head on a decoder, initialised from
`ppo.critic_path`, default the reward model, else the policy's start), the frozen reference (the starting
policy or `ppo.ref_path`) and the frozen reward model (`ppo.reward_model`: a jaxalign RM run/dir or an HF
*ForSequenceClassification directory; its stored normalisation, if any, is applied). The score is the reward
model's plus the weighted reward functions `ppo.reward_funcs` (GRPO's kind; either may be absent). Actor and
critic live in one train state as {"actor", "critic"} with one AdamW each (`ppo.critic_lr`, default optim.lr), clipped separately.

An episode: num_collect_steps batches of train.batch_size prompts are sampled with the live actor params;
for each, one jitted pass gives the actor's old log-probs (temperature-scaled), the reference log-probs,
the critic's values and the reward model's score. Per action token t (the token at t + 1):
    r_t = -kl_coef * kl_t  (+ the clipped score - missing-EOS penalty at the LAST REAL COMPLETION TOKEN)
as OpenRLHF (TRL puts the score one past it); kl is k1 (log pi_old - log pi_ref) or k3. GAE(gamma, lambda)
gives advantages and returns (returns before whitening), advantages are then whitened over the episode
batch's action tokens. The next ppo_epochs * num_collect_steps steps each train on one collected batch:
clipped surrogate + vf_coef * clipped value loss (around the old values). Checkpoints fall on episode
boundaries; the adaptive KL coefficient (`ppo.adaptive_kl`, Ziegler et al.) is saved with them.

ptx (InstructGPT's pretraining mix, ColossalChat's ptx_coef): with `ppo.ptx_files` (SFT records) each step
also carries train.batch_size SFT rows and adds ptx_coef * their token-mean NLL. The two token means have
different denominators, so `pre_step` measures both over the global batch and the NLL sum is rescaled by
their ratio: exact for any micro-batch split or mesh.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import JaxalignError, loading, lora
from jaxalign.data import pipeline
from jaxalign.losses import policy as P
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.parallel import multihost
from jaxalign.rewards import load_reward_funcs
from jaxalign.train.optim import make_optimizer, per_model
from jaxalign.train.reward import last_index
from jaxalign.train.rl import FrozenRewardModel, PolicySampler, host_means, score_completions, token_logps
from jaxalign.train.run import reference_params
from jaxalign.train.sft import completion_logprobs
from jaxalign.train.task import Memory, Task, register


def episode_steps(cfg) -> int:
    return cfg.ppo.num_collect_steps * cfg.ppo.ppo_epochs


def check_config(cfg):
    c = cfg.ppo
    if not c.reward_model and not c.reward_funcs:
        raise JaxalignError("ppo.reward_model is not set (a jaxalign reward-model run or an HF "
                            "*ForSequenceClassification directory) and there are no ppo.reward_funcs")
    if c.kl_estimator not in ("k1", "k3"):
        raise JaxalignError(f"ppo.kl_estimator={c.kl_estimator!r}: expected k1 or k3")
    if c.temperature <= 0:
        raise JaxalignError("ppo.temperature must be > 0 (the policy gradient needs samples)")
    n = episode_steps(cfg)
    if n < 1 or cfg.train.steps % n or (cfg.checkpoint.every and cfg.checkpoint.every % n):
        raise JaxalignError(f"an episode is num_collect_steps x ppo_epochs = {n} steps: train.steps and "
                            "checkpoint.every must be multiples of it (checkpoints fall between episodes)")


def shape_rewards(kl, score, action_mask, kl_coef: float):
    """Per-action-token rewards [B, T]: -kl_coef * kl on every action token, plus the sequence score on the
    last real completion token (OpenRLHF's placement). Rows without action tokens get nothing."""
    action_mask = jnp.asarray(action_mask, jnp.float32)
    r = -kl_coef * kl * action_mask
    last = last_index(action_mask)
    has = jnp.any(action_mask > 0, axis=-1)
    return r.at[jnp.arange(r.shape[0]), last].add(jnp.where(has, score, 0.0))


def ppo_models(run):
    cfg, model_cfg = run.cfg, run.model_cfg
    if model_cfg.lora_rank:  # LoRA: the critic is a second adapter set (and a new value head) on the policy's base
        if cfg.ppo.critic_path:
            raise JaxalignError("ppo.critic_path cannot be used with LoRA: the critic is a second adapter set on "
                                "the policy's frozen base (with a fresh value head)")
        return {"actor": (model_cfg, None),
                "critic": (model_cfg.replace(lm_head=False, num_labels=1, reward_mean=0.0, reward_std=1.0), None)}
    # the critic starts from ppo.critic_path, else the reward model, else (reward functions only) the policy's start
    source = cfg.ppo.critic_path or cfg.ppo.reward_model or None
    critic = loading.load_config(source, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype) \
        if source else model_cfg
    if critic.vocab_size != model_cfg.vocab_size:
        raise JaxalignError(f"{source}: the critic's vocabulary ({critic.vocab_size}) differs from the "
                            f"policy's ({model_cfg.vocab_size}); they must share a tokenizer")
    critic = critic.replace(lm_head=False, num_labels=1, remat=model_cfg.remat, reward_mean=0.0, reward_std=1.0)
    return {"actor": (model_cfg, None), "critic": (critic, source)}


def ppo_optimizer(run, params_abstract):
    cfg, total_steps = run.cfg, run.cfg.train.steps
    actor, lr_fn = make_optimizer(cfg.optim, total_steps)
    critic_optim = types.SimpleNamespace(**{**cfg.optim.to_dict(), "lr": cfg.ppo.critic_lr or cfg.optim.lr})
    critic, _ = make_optimizer(critic_optim, total_steps)
    return per_model({"actor": actor, "critic": critic}), lr_fn


def ppo_loss(model, batch, rng, cfg, aux):
    c = cfg.ppo
    actor, critic = model["actor"], model["critic"]
    logp, stats, mask = completion_logprobs(actor, batch, cfg, temperature=c.temperature)
    pg, clipped, _ = P.policy_loss_terms(logp, batch["old_logps"], batch["advantages"], clip_eps=c.clip_eps)
    vf, v_clipped = P.value_loss_terms(token_values(critic, batch), batch["old_values"], batch["returns"],
                                       clip=c.value_clip)
    tokens = jnp.sum(mask)
    metrics = {"policy_loss": (jnp.sum(pg * mask), tokens), "value_loss": (jnp.sum(vf * mask), tokens),
               "clip_ratio": (jnp.sum(clipped * mask), tokens),
               "value_clipfrac": (jnp.sum(v_clipped * mask), tokens),
               "approx_kl": (jnp.sum(0.5 * (logp - batch["old_logps"]) ** 2 * mask), tokens),
               "entropy": (jnp.sum(stats["entropy"] * mask), tokens)}
    total = jnp.sum(pg * mask) + c.vf_coef * jnp.sum(vf * mask)
    if "ptx_input_ids" in batch:
        ptx_logp, ptx_mask = completion_logprobs(actor, ptx_rows(batch), cfg, with_stats=False)
        nll = -jnp.sum(ptx_logp * ptx_mask)
        metrics["ptx_loss"] = (nll, jnp.sum(ptx_mask))
        total = total + c.ptx_coef * nll * batch["ptx_scale"][0]
    return total, tokens, metrics


def token_values(critic, batch):
    """The critic's value of each state before an action token: [B, T-1], aligned with the log-probs."""
    return critic.scores(critic.hidden_states(batch["input_ids"], batch["attention_mask"]))[:, :-1]


def ptx_rows(batch):
    return {k[len("ptx_"):]: v for k, v in batch.items() if k.startswith("ptx_") and k != "ptx_scale"}


def ppo_pre_step(model, batch, rng, cfg, aux):
    """ptx_scale = (action tokens) / (ptx tokens) over the global batch (see the module docstring)."""
    if "ptx_input_ids" not in batch:
        return {}
    actions = jnp.sum(batch["completion_mask"][:, 1:])
    ptx = jnp.sum(batch["ptx_completion_mask"][:, 1:])
    return {"ptx_scale": jnp.full(batch["ptx_input_ids"].shape[:1], actions / jnp.maximum(ptx, 1.0))}


class Rollout:
    """Experience collection: generations, old/reference log-probs, values, scores, GAE (the task's rollout)."""

    def __init__(self, run):
        cfg, c = run.cfg, run.cfg.ppo
        self.cfg, self.kl_coef, self.buffer = cfg, float(c.kl_coef), []
        self.sampler = PolicySampler(run, c, run.graphdef["actor"])
        self.rm = FrozenRewardModel(run, c.reward_model, "ppo.reward_model") if c.reward_model else None
        self.funcs = load_reward_funcs(c.reward_funcs, c.reward_weights, required=False, section="ppo")
        self.ref_params = reference_params(run, c.ref_path or None)
        actor_g, critic_g, T = run.graphdef["actor"], run.graphdef["critic"], c.temperature
        ref_g = lora.reference_graphdef(run.model_cfg, self.ref_params)
        self._experience = jax.jit(lambda actor, critic, ref, batch: (
            token_logps(actor_g, actor, batch, cfg, T), token_logps(ref_g, ref, batch, cfg, T),
            token_values(nnx.merge(critic_g, critic), batch)))
        self.ptx = None
        if c.ptx_files:
            spec = pipeline.DataSpec("sft", max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                                     on_error=cfg.data.on_error)
            data = pipeline.prepare(c.ptx_files, spec, run.tokenizer, run.tok_dir, cfg.data.cache_dir or None,
                                    cfg.data.num_proc, run.log)
            self.ptx = pipeline.Batches(data, cfg.train.batch_size, seed=cfg.seed + 1, buckets=cfg.data.buckets,
                                        process_index=jax.process_index(), process_count=jax.process_count())

    def state(self) -> dict:
        return {"kl_coef": self.kl_coef, **({"ptx": self.ptx.state()} if self.ptx is not None else {})}

    def restore(self, state: dict):
        self.kl_coef = float(state["kl_coef"])
        if self.ptx is not None and "ptx" in state:
            self.ptx.restore(state["ptx"])

    def __call__(self, it, params, step):
        c = self.cfg.ppo
        k = step % episode_steps(self.cfg)
        if k == 0:
            self.buffer = [self.collect(next(it), params, step + i) for i in range(c.num_collect_steps)]
            self.whiten()
            if c.adaptive_kl:  # Ziegler et al.: move beta towards the KL target, proportionally, +-20 %
                kl = float(np.mean(multihost.allgather(np.concatenate([e["kl"] for e in self.buffer]))))
                err = np.clip(kl / c.kl_target - 1.0, -0.2, 0.2)
                self.kl_coef *= 1.0 + err * len(self.buffer) * self.cfg.train.batch_size / c.kl_horizon
        entry = self.buffer[k % c.num_collect_steps]
        batch = entry["batch"]
        if self.ptx is not None:
            sft = next(self.ptx)
            batch = {**batch, **{f"ptx_{n}": sft[n] for n in ("input_ids", "attention_mask", "completion_mask")}}
        return batch, entry["metrics"]

    def collect(self, host, params, step) -> dict:
        """One collected batch: {"batch": the step's arrays, "action": its action mask, "kl": per-row KL,
        "metrics": host metrics}."""
        c = self.cfg.ppo
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), step)
        gen = self.sampler.generate(host, params["actor"], 1, key, decode=bool(self.funcs))
        rows = gen.sequences(c.mask_truncated_completions)
        dev = mesh_lib.shard_batch(rows, self.sampler.mesh, self.sampler.rules)
        with jax.set_mesh(self.sampler.mesh):
            out = self._experience(params["actor"], params["critic"], self.ref_params, dev)
        n = len(rows["input_ids"])
        old, ref, values = (self.sampler.local(x, n) for x in out)
        score = self.sequence_scores(host, rows, gen.texts)
        action = rows["completion_mask"][:, 1:].astype(np.float32)
        kl = np.asarray(P.kl_penalty(jnp.asarray(old), jnp.asarray(ref), c.kl_estimator)) * action
        score = np.clip(score, -c.reward_clip, c.reward_clip) - c.missing_eos_penalty * (~gen.stopped)
        rewards = shape_rewards(jnp.asarray(kl), jnp.asarray(score, jnp.float32), action, self.kl_coef)
        adv, ret = P.gae(rewards, jnp.asarray(values), action, gamma=c.gamma, lam=c.lam)
        kl_seq = kl.sum(1)
        resid, var = (np.asarray(ret) - values)[action > 0], np.asarray(ret)[action > 0].var()
        columns = {"score": score.astype(np.float32), "reward": (score - self.kl_coef * kl_seq).astype(np.float32),
                   "kl": kl_seq.astype(np.float32), "completions/mean_length": gen.lengths,
                   "completions/clipped_ratio": ~gen.stopped}
        metrics = {**host_means(columns, host["weight"]), "kl_coef": self.kl_coef,
                   "explained_variance": float(np.float32(1.0 - resid.var() / max(var, 1e-8)))}
        batch = {**rows, "old_logps": old, "old_values": values * action, "advantages": np.asarray(adv),
                 "returns": np.asarray(ret)}
        return {"batch": batch, "action": action, "kl": kl_seq, "metrics": metrics}

    def sequence_scores(self, host, rows, texts):
        """The reward model's score plus the weighted reward functions (ppo.reward_funcs) of each row; 0 where
        nothing could score (a padding row, or every function returned None)."""
        total, _ = score_completions(self.funcs, self.rm, 1.0, host, texts, 1, rows)
        return np.nan_to_num(total)

    def whiten(self):
        """Advantages whitened over every action token of the episode (returns were taken before)."""
        if not self.cfg.ppo.whiten_advantages:
            return
        adv = np.concatenate([e["batch"]["advantages"].ravel() for e in self.buffer])
        m = np.concatenate([e["action"].ravel() for e in self.buffer])
        # statistics over every process's rows (each process holds its slice of the episode)
        white = multihost.local_rows(np.asarray(P.whiten(jnp.asarray(multihost.allgather(adv)),
                                                         jnp.asarray(multihost.allgather(m)))), adv.size)
        at = 0
        for e in self.buffer:
            b = e["batch"]
            size = b["advantages"].size
            b["advantages"] = (white[at:at + size].reshape(b["advantages"].shape) * e["action"]).astype(np.float32)
            at += size

    def evaluate(self, params, data) -> dict:
        """The reward model's (and reward functions') score of each held-out completion."""
        return self.sampler.evaluate(params["actor"], data, lambda host, gen: {
            "score": self.sequence_scores(host, gen.sequences(), gen.texts)})


def check_ptx(cfg):
    if cfg.ppo.ptx_files and not cfg.ppo.ptx_coef:
        raise JaxalignError("ppo.ptx_files is set but ppo.ptx_coef is 0")


def check(cfg):
    check_config(cfg)
    check_ptx(cfg)


# Names as TRL's PPOConfig / OpenRLHF / ColossalChat. train.batch_size counts prompts per collect step; an
# episode collects num_collect_steps batches, then trains ppo_epochs passes over them.
TASK = register(Task(
    "ppo", "prompt", ppo_loss, check=check, models=ppo_models, optimizer=ppo_optimizer, pre_step=ppo_pre_step,
    rollout=Rollout,
    defaults=dict(reward_model="", critic_path="", ref_path="", critic_lr=0.0, max_completion_length=256,
                  temperature=1.0, kl_coef=0.05, kl_estimator="k1", adaptive_kl=False, kl_target=6.0,
                  kl_horizon=10000, gamma=1.0, lam=0.95, clip_eps=0.2, value_clip=0.2, vf_coef=0.1,
                  reward_clip=10.0, missing_eos_penalty=0.0, whiten_advantages=True, num_collect_steps=1,
                  ppo_epochs=1, mask_truncated_completions=False, eval_temperature=0.0, ptx_files="",
                  ptx_coef=0.0, reward_funcs="", reward_weights=""),
    memory=Memory(trained_models=2, reference=lambda cfg: True, frozen_models=1)))
