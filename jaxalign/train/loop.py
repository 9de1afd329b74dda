"""The one generic training loop: build the run, make or restore the state, iterate, call the hooks.

A task plugs in through its declaration (train/task.py); the pure step is train/step.py, the set-up is
train/run.py, and logging, eval, checkpoints and the non-finite guard are hooks (train/hooks.py) around the
steps. Re-running the same config resumes from the latest checkpoint in run_dir.
"""
import dataclasses
import json
import os
import time
from typing import Optional

import jax

from jaxalign import JaxalignError, checkpoint, lora, loading, rundir
from jaxalign.convert import peft
from jaxalign.models import abstract_params
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import hooks as hooks_lib
from jaxalign.train import state as state_lib
from jaxalign.train.run import build, preflight, split_base_reference, write_run_files
from jaxalign.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class RunResult:
    run_dir: str
    step: int
    metrics: dict          # last logged train metrics
    eval_metrics: dict     # last eval metrics (empty when no eval)
    params: dict           # the trained params (with LoRA: adapters and trained extras only)
    model_config: object
    graphdef: object
    mesh: object
    frozen: Optional[dict] = None   # with LoRA: the frozen base
    rules: tuple = mesh_lib.DEFAULT_RULES

    def model(self) -> "loading.LM":
        """The trained policy as a `jaxalign.loading.LM` (with LoRA: adapters merged into the base)."""
        multi = isinstance(self.graphdef, dict)
        pick = (lambda t: next(iter(t.values()))) if multi else (lambda t: t)
        if self.frozen is None:
            return loading.LM(self.model_config, pick(self.graphdef), pick(self.params), self.mesh, self.rules,
                              source=self.run_dir)
        cfg, params = lora.merge(self.model_config, lora.combine(pick(self.frozen), pick(self.params)))
        return loading.LM(cfg, abstract_params(cfg)[0], params, self.mesh, self.rules, source=self.run_dir)


def train(cfg, task, log=print) -> RunResult:
    """Run (or resume) the training job described by `cfg` in cfg.run_dir, holding the run directory's lock
    (process 0; jaxalign/rundir.py) throughout: a second run on the same directory fails before touching it."""
    if not cfg.run_dir:
        raise JaxalignError("run_dir is not set")
    preflight(cfg, task)  # a config it refuses leaves no run directory behind
    os.makedirs(cfg.run_dir, exist_ok=True)
    with rundir.locked(cfg.run_dir, enabled=jax.process_index() == 0, log=log):
        return _train(cfg, task, log)


def _train(cfg, task, log) -> RunResult:
    start = checkpoint.latest_run_step(cfg.run_dir)
    if start is not None:
        log(f"resuming from step {start}")  # the first line of a resumed run's output
    run = build(cfg, task, log=log)
    ckpt = checkpoint.RunCheckpoints(cfg.run_dir, cfg.checkpoint.max_to_keep, cfg.checkpoint.async_save)
    it = run.train_batches()
    data_state = None
    if start is not None:
        state, data_state = ckpt.restore(start, state_lib.abstract_state(run.tx, run.params_abs, run.shardings))
        it.restore(data_state["iterator"])
    else:
        start = 0
        write_run_files(run)
        state = state_lib.init_state(run.tx, run.initial_params(), run.shardings, cfg.seed)

    aux = task.setup(run) if task.setup else None
    ref_is_base, step_aux = split_base_reference(aux, run.base)
    dropout = cfg.lora.dropout if run.lora_spec else 0.0
    step_fn = jax.jit(make_train_step(task, run.graphdef, run.tx, run.lr_fn, cfg, run.n_micro, run.compose,
                                      dropout, ref_is_base),
                      out_shardings=(run.shardings, None), donate_argnums=0)
    rollout = task.rollout(run) if task.rollout else None
    if rollout is not None and data_state is not None and "rollout" in data_state:
        rollout.restore(data_state["rollout"])
    eval_fn = jax.jit(make_eval_step(task, run.graphdef, cfg))

    def run_eval(params):
        if rollout is not None:
            return rollout.evaluate(run.full(params), run.eval_data)
        return hooks_lib.evaluate(eval_fn, run.full(params), run.eval_data, run, aux)

    logger = hooks_lib.Logger(run, start)
    evaluator = hooks_lib.Evaluator(run, logger, run_eval, start)
    hooks = [hooks_lib.NonFiniteGuard(cfg.train.max_nonfinite_steps), logger, evaluator,
             hooks_lib.Checkpointer(run, ckpt, it, rollout)]
    step = start
    try:
        for h in hooks:
            h.start(state)
        while step < cfg.train.steps:
            t0 = time.time()
            if rollout is None:
                host, host_metrics = next(it), {}
                if task.host_batch is not None:
                    host = task.host_batch(run, host)
            else:
                host, host_metrics = rollout(it, run.full(state["params"]), step)
            host_seconds = time.time() - t0  # host arrays: the rollout's device work is done
            with jax.set_mesh(run.mesh):
                state, report = step_fn(state, hooks_lib.device_batch(host, task, run.mesh, run.rules), step_aux,
                                        run.frozen)
            step += 1
            info = hooks_lib.StepInfo(step, state, report, host, host_metrics, host_seconds)
            for h in hooks:
                h.after_step(info)
    finally:
        for h in reversed(hooks):
            h.close()
    if step == cfg.train.steps:
        finish(run, state["params"])
    return RunResult(cfg.run_dir, step, logger.last, evaluator.metrics, state["params"], run.model_cfg,
                     run.graphdef, run.mesh, run.frozen, run.rules)


def finish(run, params):
    """After the last step: the task's finish (which may update the model config, e.g. reward statistics),
    then the HF export (and with LoRA the PEFT adapter) when checkpoint.export_hf."""
    cfg = run.cfg
    if run.task.finish is not None:
        run.model_cfg = run.task.finish(run, run.full(params))
        write_run_files(run)
    if cfg.checkpoint.export_hf:
        export_hf(cfg.run_dir, run.model_cfg, run.pick(run.graphdef), run.pick(run.full(params)), run.mesh,
                  run.rules)
        if run.lora_spec:
            peft.save_peft(run.model_cfg, run.pick(params), os.path.join(cfg.run_dir, "adapter"),
                           base_name=cfg.init_from or cfg.model.path, dropout=run.lora_spec.dropout)


def export_hf(run_dir, model_cfg, graphdef, params, mesh, rules):
    """The policy as an HF checkpoint in run_dir/hf (with LoRA: merged, in the frozen base's dtype)."""
    if model_cfg.lora_rank or model_cfg.quantized:
        model_cfg, params = lora.merge(model_cfg, params)
        model_cfg = model_cfg.replace(param_dtype=str(params["embed"].dtype))
    lm = loading.LM(model_cfg, graphdef, params, mesh, rules, source=run_dir)
    lm.save_pretrained(os.path.join(run_dir, "hf"), overwrite=True)


def read_metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
