"""What the online-RL tasks (GRPO, PPO) share: sampling from the live policy, the generations record,
scoring with reward functions and a frozen reward model, frozen log-probs, held-out evaluation, and the host
metrics a rollout hands the loop.

Each rollout (grpo.Rollout, ppo.Rollout) holds a `PolicySampler`; called as rollout(prompts, params, step) it
returns (host batch, host metrics): the arrays the train step takes, and floats the loop logs as they are.
"""
import dataclasses
import itertools
from typing import Optional

import jax
import numpy as np
from flax import nnx

from jaxalign import JaxalignError, loading, sampling
from jaxalign.models import abstract_params
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.parallel import multihost
from jaxalign.train.reward import rewards
from jaxalign.train.run import initial_params
from jaxalign.train.sft import completion_logprobs


@dataclasses.dataclass
class Generations:
    """Completions of a host batch's prompts, G per prompt (rows prompt-major), on the host."""
    prompt_ids: np.ndarray       # [n, P] left-padded prompts, each repeated G times
    prompt_mask: np.ndarray      # [n, P] bool
    tokens: np.ndarray           # [n, N] completion tokens (stop token included, pad after)
    lengths: np.ndarray          # [n] completion lengths
    stopped: np.ndarray          # [n] bool: ended on a stop token (else cut at max_new_tokens)
    texts: Optional[list]        # [n] decoded completions without the stop token (None when not decoded)

    def sequences(self, mask_truncated: bool = False) -> dict:
        """Training rows: the left-padded prompt, then the completion (stop token included), pad after.
        The completion mask leaves out completions cut by max_new_tokens when `mask_truncated`."""
        N = self.tokens.shape[1]
        gen_mask = np.arange(N)[None] < self.lengths[:, None]
        comp_mask = gen_mask & (self.stopped[:, None] | (not mask_truncated))
        return {"input_ids": np.concatenate([self.prompt_ids, self.tokens], 1).astype(np.int32),
                "attention_mask": np.concatenate([self.prompt_mask, gen_mask], 1).astype(np.int32),
                "completion_mask": np.concatenate([np.zeros_like(self.prompt_mask), comp_mask], 1).astype(np.int32)}


class PolicySampler:
    """The sampler over a policy's live params (same arrays, same mesh) on the host side of a step."""

    def __init__(self, run, section, graphdef):
        self.run, self.graphdef, self.mesh, self.rules, self.tok = run, graphdef, run.mesh, run.rules, run.tokenizer
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        eos = (self.tok.eos_token_id,) if self.tok.eos_token_id is not None else ()
        stops = sampling.stop_ids(run.model_cfg, None, eos)
        self.train_params, self.eval_params = (
            sampling.SamplingParams(max_new_tokens=section.max_completion_length, temperature=t,
                                    stop_token_ids=stops, pad_token_id=pad)
            for t in (section.temperature, section.eval_temperature))

    def local(self, x, n):
        """This process's n rows of a global array, on the host."""
        return multihost.local_rows(mesh_lib.to_host(x), n)

    def generate(self, host, params, G: int, key, sp=None, decode: bool = True) -> Generations:
        """G completions of each prompt row of `host` (randomness keyed by the rows' dataset index)."""
        sp = sp or self.train_params
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
        return Generations(ids, mask, tokens, lengths, stopped, texts)

    def evaluate(self, params, data, columns) -> dict:
        """Weighted means over the held-out prompts of columns(host, generations) for one completion each
        (greedy unless <task>.eval_temperature), plus the completion length."""
        cfg = self.run.cfg
        it, batches = self.run.eval_batches(data)
        sums, n = {}, 0.0
        for host in itertools.islice(it, batches):
            gen = self.generate(host, params, 1, jax.random.PRNGKey(cfg.seed + 1), self.eval_params)
            cols = {**columns(host, gen), "completions/mean_length": gen.lengths}
            w = np.asarray(host["weight"], np.float64)
            for k, v in cols.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(np.nan_to_num(np.asarray(v, np.float64)) * w))
            n += float(w.sum())
        return {f"eval/{k}": v / max(n, 1e-9) for k, v in sums.items()}


def host_means(columns: dict, weight) -> dict:
    """Weighted means over every process's rows of per-row host columns: the metrics a rollout logs.
    A column named `<name>_sq` (a square) becomes `<name>_std` beside `<name>`."""
    w = np.asarray(weight, np.float64)
    names = sorted(columns)
    local = np.array([[np.sum(np.asarray(columns[k], np.float64) * w) for k in names] + [np.sum(w)]])
    total = multihost.allgather(local).sum(0)
    means = dict(zip(names, total[:-1] / max(total[-1], 1e-9)))
    for k in [k for k in names if k.endswith("_sq") and k[:-3] in means]:
        means[k[:-3] + "_std"] = float(np.sqrt(max(means.pop(k) - means[k[:-3]] ** 2, 0.0)))
    return {k: float(v) for k, v in means.items()}


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


class FrozenRewardModel:
    """A reward model (jaxalign RM or HF *ForSequenceClassification directory) held frozen for online RL:
    score(rows) gives this process's rows' normalised scores (numpy), one jitted forward per call."""

    def __init__(self, run, path: str, field: str):
        cfg, model_cfg = run.cfg, run.model_cfg
        rm_cfg = loading.load_config(path, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
        if not rm_cfg.num_labels:
            raise JaxalignError(f"{field} {path}: not a reward model (no scalar head)")
        graphdef = abstract_params(rm_cfg)[0]
        self.params, self.mesh, self.rules = initial_params(cfg, rm_cfg, run.mesh, run.rules, source=path), \
            run.mesh, run.rules
        self._score = jax.jit(lambda p, b: rewards(nnx.merge(graphdef, p), b))

    def score(self, rows):
        dev = mesh_lib.shard_batch({k: rows[k] for k in ("input_ids", "attention_mask")}, self.mesh, self.rules)
        with jax.set_mesh(self.mesh):
            out = self._score(self.params, dev)
        return multihost.local_rows(mesh_lib.to_host(out), len(rows["input_ids"]))


def token_logps(graphdef, params, batch, cfg, temperature):
    """Completion token log-probs of a (frozen or current) policy under softmax(logits / temperature)."""
    return completion_logprobs(nnx.merge(graphdef, params), batch, cfg, with_stats=False,
                               temperature=temperature)[0]
