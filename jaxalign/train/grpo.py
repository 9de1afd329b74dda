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
from flax import nnx

from jaxalign import JaxalignError, sampling
from jaxalign.data.pipeline import Batches
from jaxalign.losses import policy as P
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.parallel import multihost
from jaxalign.rewards import load_reward_funcs
from jaxalign import lora
from jaxalign.train.loop import Task, reference_params
from jaxalign.train.reward import FrozenRewardModel
from jaxalign.train.sft import completion_logprobs

METRIC = "metric/"  # batch columns under this prefix are logged as weighted means


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
    loss, clipped, kl = P.policy_loss_terms(logp, old, batch["advantages"], clip_eps=c.epsilon,
                                            clip_eps_high=c.epsilon_high or None, ref_logps=batch.get("ref_logps"),
                                            kl_coef=c.beta, kl_estimator=c.kl_estimator)
    total, denom = P.aggregate(loss, mask, c.aggregation, c.max_completion_length)
    tokens = jnp.sum(mask)
    metrics = {"kl": (jnp.sum(kl * mask), tokens), "clip_ratio": (jnp.sum(clipped * mask), tokens),
               "entropy": (jnp.sum(stats["entropy"] * mask), tokens), **rollout_metrics(batch)}
    return total, denom, metrics


def rollout_metrics(batch) -> dict:
    """The rollout's per-row columns (METRIC/<name>) as weighted means."""
    w = batch["weight"]
    return {k[len(METRIC):]: (jnp.sum(v * w), jnp.sum(w)) for k, v in batch.items() if k.startswith(METRIC)}


def token_logps(graphdef, params, batch, cfg, temperature):
    """Completion token log-probs of a (frozen or current) policy under softmax(logits / temperature)."""
    return completion_logprobs(nnx.merge(graphdef, params), batch, cfg, with_stats=False,
                               temperature=temperature)[0]


class Generator:
    """The sampler over a policy's live params on the host side of a step: prompts in, sequences out."""

    def __init__(self, cfg, section, model_cfg, graphdef, mesh, rules, tokenizer):
        self.cfg, self.graphdef, self.mesh, self.rules, self.tok = cfg, graphdef, mesh, rules, tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
        stops = sampling.stop_ids(model_cfg, None, eos)
        self.sp, self.eval_sp = (sampling.SamplingParams(max_new_tokens=section.max_completion_length,
                                                         temperature=t, stop_token_ids=stops, pad_token_id=pad)
                                 for t in (section.temperature, section.eval_temperature))

    def local(self, x, n):
        """This process's n rows of a global array, on the host."""
        return multihost.local_rows(mesh_lib.to_host(x), n)

    def generate(self, host, params, sp, G, key, decode: bool = True):
        """Completions of each prompt row repeated G times: (ids, mask, tokens [n, N], lengths, stopped, texts)."""
        ids = np.repeat(host["input_ids"], G, axis=0)
        mask = np.repeat(host["attention_mask"], G, axis=0).astype(bool)
        index = np.maximum(np.asarray(host["index"]), 0)
        row_ids = (np.repeat(index, G) * G + np.tile(np.arange(G), len(index))).astype(np.int32)
        batch = mesh_lib.shard_batch({"ids": ids, "mask": mask, "rows": row_ids}, self.mesh, self.rules)
        with jax.set_mesh(self.mesh):
            out = sampling.sample(self.graphdef, params, batch["ids"], batch["mask"], key, batch["rows"], sp,
                                  self.rules)
        n = len(ids)
        tokens, lengths, stopped = (self.local(x, n) for x in (out.tokens, out.lengths, out.stopped_on_eos))
        texts = [self.tok.decode(t[:k - int(s)], skip_special_tokens=True)
                 for t, k, s in zip(tokens, lengths, stopped)] if decode else None
        return ids, mask, tokens, lengths, stopped, texts

    def policy(self, params):
        """The sampling policy's params within the train state's params."""
        return params

    def evaluate(self, params, data) -> dict:
        """Weighted means over the held-out prompts of eval_columns() for one completion each (greedy unless
        <task>.eval_temperature), plus the completion length."""
        it = Batches(data, self.cfg.train.batch_size, shuffle=False, epochs=1, drop_last=False,
                     buckets=self.cfg.data.buckets, process_index=jax.process_index(),
                     process_count=jax.process_count())
        sums, n = {}, 0.0
        for i, host in enumerate(it):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            generated = self.generate(host, self.policy(params), self.eval_sp, 1,
                                      jax.random.PRNGKey(self.cfg.seed + 1))
            cols = {**self.eval_columns(host, params, generated), "completions/mean_length": generated[3]}
            w = np.asarray(host["weight"], np.float64)
            for k, v in cols.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(np.nan_to_num(np.asarray(v, np.float64)) * w))
            n += float(w.sum())
        return {f"eval/{k}": v / max(n, 1e-9) for k, v in sums.items()}

    @staticmethod
    def sequences(ids, mask, tokens, lengths, stopped, mask_truncated: bool) -> dict:
        """Training rows: the left-padded prompt, then the completion (stop token included), pad after.
        The completion mask leaves out completions cut by max_new_tokens when `mask_truncated`."""
        N = tokens.shape[1]
        gen_mask = np.arange(N)[None] < lengths[:, None]
        comp_mask = gen_mask & (stopped[:, None] | (not mask_truncated))
        return {"input_ids": np.concatenate([ids, tokens], 1).astype(np.int32),
                "attention_mask": np.concatenate([mask, gen_mask], 1).astype(np.int32),
                "completion_mask": np.concatenate([np.zeros_like(mask), comp_mask], 1).astype(np.int32)}


def score_completions(funcs, rm, rm_weight, host, texts, G, rows=None):
    """Weighted reward sum [n] (NaN where nothing could score) and each reward's values, for the n = rows*G
    completions `texts` of a host batch (G per prompt): reward functions called with the prompts, the
    completions and the records' extra fields, plus `rm_weight` times the reward model's score of `rows`.
    Padding rows (weight 0: the end of an eval set) are not shown to the reward functions."""
    is_real = np.repeat(np.asarray(host["weight"]) > 0, G)
    real, n = np.flatnonzero(is_real), len(is_real)
    prompts = [host["prompt"][i // G] for i in real]
    extras = [host["extra"][i // G] for i in real]
    kwargs = {k: [e.get(k) for e in extras] for k in sorted({k for e in extras for k in e})}
    total, each = np.zeros(n), {}
    scored = np.zeros(n, bool)
    for name, fn, w in funcs:
        vals = fn(prompts=prompts, completions=[texts[i] for i in real], **kwargs)
        if len(vals) != len(real):
            raise JaxalignError(f"reward function {name} returned {len(vals)} values for {len(real)} completions")
        r = np.full(n, np.nan)
        r[real] = [np.nan if v is None else float(v) for v in vals]
        each[name] = r
        scored |= ~np.isnan(r)
        total += w * np.nan_to_num(r)
    if rm is not None:
        r = np.where(is_real, rm.score(rows), np.nan)
        each["reward_model"] = r
        scored |= ~np.isnan(r)
        total += rm_weight * np.nan_to_num(r)
    return np.where(scored, total, np.nan), each


class Rollout(Generator):
    """Generation, scoring and advantages on the host side of each step (Task.make_rollout)."""

    def __init__(self, cfg, model_cfg, graphdef, mesh, rules, tokenizer, log, base=None):
        check_config(cfg)
        super().__init__(cfg, cfg.grpo, model_cfg, graphdef, mesh, rules, tokenizer)
        self.log = log
        self.funcs = load_reward_funcs(cfg.grpo.reward_funcs, cfg.grpo.reward_weights,
                                       required=not cfg.grpo.reward_model)
        self.rm = FrozenRewardModel(cfg, cfg.grpo.reward_model, model_cfg, mesh, rules, "grpo.reward_model") \
            if cfg.grpo.reward_model else None
        self.ref = reference_params(cfg, model_cfg, mesh, rules, cfg.grpo.ref_path or None, base) \
            if cfg.grpo.beta else None  # beta = 0: no reference model is loaded
        self.G = cfg.grpo.num_generations
        self.cached = None
        T = cfg.grpo.temperature
        self._frozen_logps = jax.jit(lambda policy, ref, batch: {
            **({"old_logps": token_logps(graphdef, policy, batch, cfg, T)} if policy is not None else {}),
            **({"ref_logps": token_logps(lora.reference_graphdef(model_cfg, ref), ref, batch, cfg, T)}
               if ref is not None else {})})

    # ---- scoring
    def score(self, host, texts, G, rows=None):
        return score_completions(self.funcs, self.rm, self.cfg.grpo.reward_model_weight, host, texts, G, rows)

    def state(self) -> dict:
        return {}

    def restore(self, state: dict):
        pass

    def __call__(self, it, params, step):
        mu = self.cfg.grpo.num_iterations
        if self.cached is not None and step % mu:
            return self.cached
        return self.rollout(next(it), params, step)

    def rollout(self, host, params, step):
        """Generations, rewards and advantages of one batch of prompts (the training batch)."""
        c = self.cfg.grpo
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), step)
        ids, mask, tokens, lengths, stopped, texts = self.generate(host, params, self.sp, self.G, key)
        rows = self.sequences(ids, mask, tokens, lengths, stopped, c.mask_truncated_completions)
        rewards, each = self.score(host, texts, self.G, rows)
        ok = ~np.isnan(rewards)
        # groups are whole within a process, but batch-scaled and reinforce++ statistics span all processes
        everyone = multihost.allgather(np.nan_to_num(rewards))
        adv = multihost.local_rows(np.asarray(P.group_advantages(everyone, self.G, scale=c.scale_rewards,
                                                                 estimator=c.estimator)), len(rewards))
        adv = np.where(ok, adv, 0.0)
        weight = np.repeat(host["weight"], self.G).astype(np.float32)
        batch = {**rows, "advantages": adv.astype(np.float32), "weight": weight,
                 METRIC + "reward": np.nan_to_num(rewards).astype(np.float32),
                 METRIC + "reward_sq": (np.nan_to_num(rewards) ** 2).astype(np.float32),
                 METRIC + "completions/mean_length": lengths.astype(np.float32),
                 METRIC + "completions/clipped_ratio": (~stopped).astype(np.float32),
                 METRIC + "frac_reward_zero_std": np.repeat(
                     np.nan_to_num(rewards).reshape(-1, self.G).std(1) == 0, self.G).astype(np.float32)}
        for name, r in each.items():
            batch[f"{METRIC}rewards/{name}"] = np.nan_to_num(r).astype(np.float32)
        if c.num_iterations > 1 or self.ref is not None:  # once per generation round, one pass
            dev = mesh_lib.shard_batch({k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")},
                                       self.mesh, self.rules)
            with jax.set_mesh(self.mesh):
                out = self._frozen_logps(params if c.num_iterations > 1 else None, self.ref, dev)
            batch.update({k: self.local(v, len(ids)) for k, v in out.items()})
        self.cached = batch
        return batch

    # ---- eval: rewards of one completion per held-out prompt (greedy by default)
    def eval_columns(self, host, params, generated) -> dict:
        ids, mask, tokens, lengths, stopped, texts = generated
        rewards, each = self.score(host, texts, 1, self.sequences(ids, mask, tokens, lengths, stopped, False))
        return {"reward": rewards, **{f"rewards/{k}": v for k, v in each.items()}}


TASK = Task("grpo", grpo_loss,
            batch_keys=None,
            make_rollout=Rollout)
