"""What the loop calls around its steps: logging and progress, the non-finite guard, eval, checkpoints.

Each hook has `start(state)` (before the first step), `after_step(info)` (after each) and `close()` (always,
also on an error). `info` is a `StepInfo`: the step just taken, the new state, the device report and the
host batch with its host-side metrics (an online-RL rollout's rewards and lengths).
"""
import dataclasses
import itertools
import time

import jax
import numpy as np

from jaxalign import JaxalignError
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import metrics as metrics_lib
from jaxalign.train.step import with_std


class NonFiniteError(JaxalignError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class StepInfo:
    step: int
    state: dict
    report: dict           # the step's device report (loss, grad_norm, lr, nonfinite, the task's metrics)
    host: dict             # the host batch it trained on
    host_metrics: dict     # floats measured on the host (rollouts), logged beside the report
    host_seconds: float    # wall time spent producing the host batch (a rollout's generation and scoring)


def task_batch(host: dict, task) -> dict:
    """The host batch's arrays the task's step takes (its batch_keys, else every array)."""
    keys = task.batch_keys or [k for k, v in host.items() if isinstance(v, np.ndarray)]
    return {k: host[k] for k in keys}


def device_batch(host: dict, task, mesh, rules):
    return mesh_lib.shard_batch(task_batch(host, task), mesh, rules)


def _arrays(host: dict, suffix: str):
    return [(k, v) for k, v in host.items() if isinstance(v, np.ndarray) and k.endswith(suffix)]


def host_rows(host: dict) -> int:
    """Sequences in a host batch (chosen + rejected for pairs, generations for RL, ptx rows)."""
    return sum(v.shape[0] for _, v in _arrays(host, "input_ids"))


def real_tokens(host: dict) -> int:
    return int(sum(v.sum() for _, v in _arrays(host, "attention_mask")))


def evaluate(eval_fn, params, data, run, aux=None) -> dict:
    """Sums of eval_fn(params, batch, aux) over the eval set (train.eval_batches of it), as eval/ means."""
    task = run.task
    it, n = run.eval_batches(data)
    totals = {}
    for host in itertools.islice(it, n):
        if task.host_batch is not None:
            host = task.host_batch(run, host)
        with jax.set_mesh(run.mesh):
            out = jax.device_get(eval_fn(params, device_batch(host, task, run.mesh, run.rules), aux))
        for k, (s, c) in out.items():
            a, b = totals.get(k, (0.0, 0.0))
            totals[k] = (a + float(s), b + float(c))
    means = with_std({k: s / max(c, 1e-9) for k, (s, c) in totals.items()})
    return {f"eval/{k}": float(v) for k, v in means.items()}


class Logger:
    """metrics.jsonl / TensorBoard every train.log_every steps (window means, tokens/s, MFU, the rollout
    share of wall time) and the progress bar."""

    def __init__(self, run, start: int):
        from tqdm import tqdm
        cfg = run.cfg
        self.run, self.every, self.last_step = run, cfg.train.log_every, cfg.train.steps
        self.writer = metrics_lib.MetricsWriter(cfg.run_dir, resume_step=start or None)
        self.peak = metrics_lib.peak_flops(cfg.train.peak_flops)
        self.n_dev = len(jax.devices())
        self.bar = tqdm(total=cfg.train.steps, initial=start, mininterval=1.0, dynamic_ncols=True, unit="step",
                        disable=not cfg.train.progress or jax.process_index() != 0)
        self.last = {}
        self._reset()

    def _reset(self):
        self.window, self.tokens, self.flops, self.host_s, self.t0 = [], 0, 0.0, 0.0, time.time()

    def start(self, state):
        pass

    def write(self, step: int, metrics: dict):
        self.writer.write(step, metrics)

    def after_step(self, info: StepInfo):
        host, n = info.host, jax.process_count()
        T = max(v.shape[1] for k, v in _arrays(host, "input_ids"))
        self.tokens += real_tokens(host) * n
        self.flops += metrics_lib.train_flops_per_token(self.run.model_cfg, T) * host_rows(host) * n * T
        self.host_s += info.host_seconds
        self.window.append({**info.report, **info.host_metrics})
        if info.step % self.every == 0 or info.step == self.last_step:
            elapsed = max(time.time() - self.t0, 1e-9)
            last = {k: float(np.mean([float(r[k]) for r in self.window])) for k in self.window[-1]}
            last["nonfinite"] = float(sum(float(r["nonfinite"]) for r in self.window))
            last["tokens_per_sec"] = self.tokens / elapsed
            last["step_time"] = elapsed / len(self.window)
            last["tflops_per_sec_per_device"] = self.flops / elapsed / self.n_dev / 1e12
            if self.peak:
                last["mfu"] = self.flops / elapsed / self.n_dev / self.peak
            if self.run.task.rollout is not None:  # generation, scoring and rollout log-probs
                last["rollout_share"] = self.host_s / elapsed
            self.writer.write(info.step, last)
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_sec']:.0f}")
            self.last = last
            self._reset()
        self.bar.update(1)

    def close(self):
        self.bar.close()
        self.writer.close()


class NonFiniteGuard:
    """Stops the run after train.max_nonfinite_steps consecutive non-finite steps (the step itself keeps the
    old state on such a step, so no checkpoint ever holds non-finite parameters)."""

    def __init__(self, limit: int):
        self.limit, self.run_length = limit, 0

    def start(self, state):
        pass

    def after_step(self, info: StepInfo):
        self.run_length = self.run_length + 1 if float(info.report["nonfinite"]) else 0
        if self.run_length >= self.limit:
            raise NonFiniteError(f"{self.run_length} consecutive steps with a non-finite loss or gradient "
                                 f"(last at step {info.step}); the last checkpoint holds finite parameters")

    def close(self):
        pass


class Evaluator:
    """Eval before training (train.eval_before), every train.eval_every steps and at the last step: the
    task's loss over the eval set, or an online-RL rollout's own evaluate()."""

    def __init__(self, run, logger: Logger, evaluate_fn, start: int):
        self.run, self.logger, self.evaluate_fn, self.start_step = run, logger, evaluate_fn, start
        self.metrics = {}

    def _eval(self, step, params, label):
        self.metrics = self.evaluate_fn(params)
        self.logger.write(step, self.metrics)
        self.run.log(f"{label}: " + ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items()))

    def start(self, state):
        if self.run.eval_data is not None and self.run.cfg.train.eval_before and self.start_step == 0:
            self._eval(0, state["params"], "before training")

    def after_step(self, info: StepInfo):
        c = self.run.cfg.train
        if self.run.eval_data is not None and c.eval_every and (info.step % c.eval_every == 0
                                                                or info.step == c.steps):
            self._eval(info.step, info.state["params"], f"step {info.step}")

    def close(self):
        pass


class Checkpointer:
    """Orbax checkpoints every checkpoint.every steps and at the last one, with the data iterator's position
    and the rollout's own state (so a resumed run continues exactly)."""

    def __init__(self, run, ckpt, it, rollout):
        self.cfg, self.ckpt, self.it, self.rollout = run.cfg, ckpt, it, rollout

    def start(self, state):
        pass

    def after_step(self, info: StepInfo):
        every, step = self.cfg.checkpoint.every, info.step
        if (every and step % every == 0) or step == self.cfg.train.steps:
            extra = {"rollout": self.rollout.state()} if self.rollout is not None else {}
            self.ckpt.save(step, info.state, {"iterator": self.it.state(), "step": step, **extra})

    def close(self):
        self.ckpt.close()
