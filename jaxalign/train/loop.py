"""The one generic training loop (DESIGN.md §3).

A task is a loss over a batch, returned unreduced: (loss_sum, denominator, {metric: (sum, count)}).
The loop owns the rest: micro-batch accumulation (sums and denominators, so the result is the global
mean whatever the micro-batch size, accumulation steps or mesh), clipping and the optimizer, a NaN/Inf
guard, logging, eval, checkpoints and resume, HF export.
"""
import dataclasses
import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxalign import JaxalignError, checkpoint, lora, models
from jaxalign.data import pipeline, templates
from jaxalign.models.presets import get_preset
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import metrics as metrics_lib
from jaxalign.train import state as state_lib
from jaxalign.train.optim import make_optimizer


class NonFiniteError(JaxalignError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    # loss(model, batch, rng, cfg) -> (loss_sum, denominator, {name: (sum, count)}); batch holds arrays.
    loss: Callable
    # Which host-batch keys go to the devices (the rest, e.g. reward-function extras, stay on the host).
    batch_keys: Optional[tuple] = None
    # Adjust the model config (e.g. a reward head); identity by default.
    model_config: Callable = lambda model_cfg, cfg: model_cfg
    # setup(cfg, model_cfg, graphdef, mesh, rules, datasets, log, base) -> aux: frozen arrays every step receives
    # (e.g. reference params); it may also attach per-example columns to the datasets (precomputed values).
    # `base` (setup and make_rollout): with LoRA, the frozen base params (see reference_params), else None.
    setup: Optional[Callable] = None
    # pre_step(model, batch, cfg, aux) -> {name: [B, ...] array}: values that need the whole global batch
    # (e.g. KTO's KL reference point), computed once per step without gradient and added to the batch
    # before it is split into micro-batches.
    pre_step: Optional[Callable] = None
    # finish(cfg, model_cfg, graphdef, params, datasets, mesh, rules, log) -> model_cfg: once after the last
    # step, before the export (e.g. the reward model's normalisation statistics, stored in the config).
    finish: Optional[Callable] = None
    # make_rollout(cfg, model_cfg, graphdef, mesh, rules, tokenizer, log, base) -> a Rollout for online RL: called
    # with (prompt iterator, params, step) it returns the host batch to train on (generations, rewards,
    # advantages), pulling prompts when it needs them; evaluate(params, data) replaces the loss-based eval;
    # state()/restore(d) carry its own state (e.g. an adaptive KL coefficient) through checkpoints.
    make_rollout: Optional[Callable] = None
    # models(cfg, model_cfg) -> {name: (model_config, source)} for tasks that train several models at once
    # (PPO: actor and critic). Params, graphdefs and the loss's model are then dicts by name; the first
    # model is the policy (exported, and what a run directory loads as).
    models: Optional[Callable] = None
    # optimizer(cfg, total_steps, params_abstract) -> (tx, lr_fn) replacing the single AdamW (e.g. one per model).
    optimizer: Optional[Callable] = None


def merge(graphdef, params):
    """The model (or, for multi-model tasks, {name: model}) a loss receives."""
    if isinstance(graphdef, dict):
        return {k: nnx.merge(g, params[k]) for k, g in graphdef.items()}
    return nnx.merge(graphdef, params)


def with_std(metrics: dict) -> dict:
    """Each `<name>_sq` (a mean of squares) next to its mean `<name>` becomes `<name>_std`."""
    sq = [k for k in metrics if k.endswith("_sq") and k[:-3] in metrics]
    out = {k: v for k, v in metrics.items() if k not in sq}
    for k in sq:
        out[k[:-3] + "_std"] = jnp.sqrt(jnp.maximum(metrics[k] - metrics[k[:-3]] ** 2, 0.0))
    return out


def _zeros_like_tree(t):
    return jax.tree.map(jnp.zeros_like, t)


def _split_micro(x, n):
    """[B, ...] -> [n, B/n, ...] taking rows i::n into micro-batch i, so each micro-batch spans every
    data-parallel shard (a contiguous split would put each micro-batch on a few devices only)."""
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return mesh_lib.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))


def full_params(graphdef, params, frozen):
    """The params a model runs with: with LoRA, the trainable ones laid over the frozen base (per model for
    multi-model tasks); without, `params` itself."""
    if frozen is None:
        return params
    if isinstance(graphdef, dict):
        return {k: lora.combine(frozen[k], params[k]) for k in graphdef}
    return lora.combine(frozen, params)


def _with_lora_dropout(model, rate: float, key):
    """Turn on LoRA dropout for this (traced, throw-away) model object: the train step's own copy only."""
    for i, m in enumerate(model.values() if isinstance(model, dict) else [model]):
        object.__setattr__(m, "lora_dropout", (rate, jax.random.fold_in(key, i)))
    return model


def make_train_step(task: Task, graphdef, tx, lr_fn, cfg, n_micro: int, ref_is_base: bool = False):
    """The jitted-to-be step(state, batch, aux, frozen). `ref_is_base`: the task's reference (aux["ref"]) is the
    LoRA base, passed once as `frozen` and put back into aux here (the same arrays as two jit arguments would
    be counted twice by XLA's memory analysis)."""
    dropout = cfg.lora.dropout if cfg.lora.rank else 0.0

    def loss_fn(params, batch, key, aux, frozen):
        model = merge(graphdef, full_params(graphdef, params, frozen))
        if dropout:
            key, sub = jax.random.split(key)
            model = _with_lora_dropout(model, dropout, sub)
        loss_sum, denom, mets = task.loss(model, batch, key, cfg, aux)
        return loss_sum, (denom, mets)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def mean_loss_fn(params, batch, key, aux, frozen):
        """The loss already divided by its (parameter-independent) denominator: gradients come out scaled, with
        no second gradient-sized buffer for `grads / denom`."""
        loss_sum, (denom, mets) = loss_fn(params, batch, key, aux, frozen)
        return loss_sum / jnp.maximum(jax.lax.stop_gradient(denom), 1e-9), (loss_sum, denom, mets)

    mean_grad_fn = jax.value_and_grad(mean_loss_fn, has_aux=True)

    def step(state, batch, aux, frozen=None):
        if ref_is_base:
            aux = {**aux, "ref": frozen}
        rng, key = jax.random.split(state["rng"])
        params = state["params"]
        batch = with_pre_step(task, graphdef, full_params(graphdef, params, frozen), batch, cfg, aux)
        if n_micro == 1:  # no accumulation scan: its zeroed accumulators and adds cost ~10% of a CPU step
            (_, (loss_sum, denom, mets)), grads = mean_grad_fn(params, batch, key, aux, frozen)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, n_micro), batch)
            keys = jax.random.split(key, n_micro)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, params, first, keys[0], aux, frozen)
            init = (_zeros_like_tree(shapes[1]), _zeros_like_tree(shapes[0]))

            def body(carry, xs):
                (grads, (loss, (denom, mets))) = carry
                (l, (d, m)), g = grad_fn(params, *xs, aux, frozen)
                return (jax.tree.map(jnp.add, grads, g),
                        (loss + l, (denom + d, jax.tree.map(jnp.add, mets, m)))), None

            (grads, (loss_sum, (denom, mets))), _ = jax.lax.scan(body, init, (micro, keys))
        denom = jnp.maximum(denom, 1e-9)
        if n_micro > 1:
            grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        # Decided before the update (a finite gradient norm means every gradient is finite, and the optimizers
        # here map finite gradients to finite updates), so the select fuses into the optimizer's elementwise pass
        # and updates the donated buffers in place. (A lax.cond instead costs the GPU compiler a copy of every
        # large parameter in the skip branch: 1B at 4096 tokens on an H200, 18.9 -> 32.2 GiB.)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        out = {"step": state["step"] + 1, "params": keep(new_params, params),
               "opt_state": keep(opt_state, state["opt_state"]), "rng": rng}
        report = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state["step"]),
                  "nonfinite": 1.0 - finite.astype(jnp.float32)}
        report.update(with_std({k: s / jnp.maximum(c, 1e-9) for k, (s, c) in mets.items()}))
        return out, report

    return step


def with_pre_step(task: Task, graphdef, params, batch, cfg, aux):
    if task.pre_step is None:
        return batch
    extra = task.pre_step(merge(graphdef, params), batch, cfg, aux)
    return {**batch, **jax.lax.stop_gradient(extra)}


def make_eval_step(task: Task, graphdef, cfg):
    def step(params, batch, aux):
        batch = with_pre_step(task, graphdef, params, batch, cfg, aux)
        loss_sum, denom, mets = task.loss(merge(graphdef, params), batch, jax.random.PRNGKey(0), cfg, aux)
        return {"loss": (loss_sum, denom), **mets}
    return step


def evaluate(eval_fn, params, data, cfg, task, mesh, rules, aux=None) -> dict:
    it = pipeline.Batches(data, cfg.train.batch_size, shuffle=False, epochs=1, drop_last=False,
                          buckets=cfg.data.buckets, process_index=jax.process_index(),
                          process_count=jax.process_count())
    totals = {}
    for i, host in enumerate(it):
        if cfg.train.eval_batches and i >= cfg.train.eval_batches:
            break
        with jax.set_mesh(mesh):
            out = jax.device_get(eval_fn(params, device_batch(host, task, mesh, rules), aux))
        for k, (s, c) in out.items():
            a, b = totals.get(k, (0.0, 0.0))
            totals[k] = (a + float(s), b + float(c))
    means = with_std({k: s / max(c, 1e-9) for k, (s, c) in totals.items()})
    return {f"eval/{k}": float(v) for k, v in means.items()}


def task_batch(host: dict, task: Task) -> dict:
    """The host batch's arrays the task's step takes (its batch_keys, else every array)."""
    keys = task.batch_keys or [k for k, v in host.items() if isinstance(v, np.ndarray)]
    return {k: host[k] for k in keys}


def device_batch(host: dict, task: Task, mesh, rules):
    return mesh_lib.shard_batch(task_batch(host, task), mesh, rules)


# -------------------------------------------------------------------------------------- set-up

def model_config(cfg, tokenizer):
    """The model's config: from model.path / init_from, or a preset sized to the tokenizer (from scratch)."""
    runtime = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                   attention_impl=cfg.model.attention_impl)
    source = cfg.init_from or cfg.model.path
    n_tokens = len(tokenizer)
    if source:
        model_cfg = models.load_config(source, **runtime)
        if n_tokens > model_cfg.vocab_size:
            raise JaxalignError(f"the tokenizer has {n_tokens} tokens but {source} has a vocabulary of "
                                f"{model_cfg.vocab_size}")
        return model_cfg
    if not cfg.model.preset:
        raise JaxalignError("set model.path (an HF or jaxalign directory) or model.preset")
    try:
        model_cfg = get_preset(cfg.model.preset, **runtime)
    except KeyError as e:
        raise JaxalignError(str(e.args[0])) from None
    # From scratch: the embedding fits the tokenizer (padded to a multiple of 64 for tidy sharding).
    return model_cfg.replace(vocab_size=-(-n_tokens // 64) * 64, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def initial_params(cfg, model_cfg, mesh, rules, source=None) -> dict:
    """Starting params: from `source` (default init_from or model.path) or a fresh init. Parameters the
    task's model does not have (an LM head under a reward model) are left out."""
    source = source or cfg.init_from or cfg.model.path
    if source:
        lm = models.from_pretrained(source, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, mesh=mesh,
                                    rules=rules, num_labels=model_cfg.num_labels or None)
    else:
        lm = models.from_config(model_cfg, mesh, rules, seed=cfg.seed)
    wanted = nnx.to_pure_dict(models.abstract_params(model_cfg)[1])
    return {k: v for k, v in lm.pure_params().items() if k in wanted}


def split_base_reference(aux, base):
    """(whether aux["ref"] is the LoRA base itself, aux without it then): see make_train_step."""
    if base is not None and isinstance(aux, dict) and aux.get("ref") is base:
        return True, {k: v for k, v in aux.items() if k != "ref"}
    return False, aux


def reference_params(cfg, model_cfg, mesh, rules, source=None, base=None):
    """A frozen reference model's params: with LoRA and no explicit `source`, the base the adapters sit on
    (the same arrays: no second copy); otherwise `source` (default: the starting model) loaded anew."""
    if base is not None and not source:
        return base
    return initial_params(cfg, model_cfg.without_lora(), mesh, rules, source=source)


def _write_run_files(cfg, model_cfg, tok_dir, lora_spec=None):
    if jax.process_index() != 0:
        return
    run_dir = cfg.run_dir
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(run_dir, models.NATIVE_CONFIG), "w") as f:
        f.write(model_cfg.to_json())
    if lora_spec:  # how to rebuild the model: the base it sits on (checkpoints hold the adapters alone)
        base = cfg.init_from or cfg.model.path
        with open(os.path.join(run_dir, lora.RUN_FILE), "w") as f:
            json.dump({"base": os.path.abspath(base) if base and os.path.isdir(base) else base,
                       **dataclasses.asdict(lora_spec)}, f, indent=2, sort_keys=True)
    from jaxalign.convert.hf import copy_tokenizer
    copy_tokenizer(tok_dir, run_dir)


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

    def model(self) -> "models.LM":
        """The trained policy as a `jaxalign.models.LM` (with LoRA: adapters merged into the base)."""
        multi = isinstance(self.graphdef, dict)
        pick = (lambda t: next(iter(t.values()))) if multi else (lambda t: t)
        if self.frozen is None:
            return models.LM(self.model_config, pick(self.graphdef), pick(self.params), self.mesh, self.rules,
                             source=self.run_dir)
        cfg, params = lora.merge(self.model_config, lora.combine(pick(self.frozen), pick(self.params)))
        return models.LM(cfg, models.abstract_params(cfg)[0], params, self.mesh, self.rules, source=self.run_dir)


def train(cfg, task: Task, log=print) -> RunResult:
    """Run (or resume) the training job described by `cfg` in cfg.run_dir."""
    if not cfg.run_dir:
        raise JaxalignError("run_dir is not set")
    os.makedirs(cfg.run_dir, exist_ok=True)
    start = checkpoint.latest_run_step(cfg.run_dir)
    if start is not None:
        log(f"resuming from step {start}")  # the first line of a resumed run's output
    mesh = mesh_lib.make_mesh(cfg.mesh.shape)
    rules = mesh_lib.normalize_rules(cfg.mesh.rules)
    tok_dir, tokenizer = load_tokenizer(cfg)
    train_data = pipeline.prepare_from_config(cfg, "train", tokenizer, log=log)
    if train_data is None:
        raise JaxalignError("data.train_files is not set")
    eval_data = pipeline.prepare_from_config(cfg, "eval", tokenizer, log=log)
    model_cfg = task.model_config(model_config(cfg, tokenizer), cfg)
    lora_spec, peft = lora.spec(cfg), None
    if lora_spec and lora_spec.init_from:
        model_cfg, peft = lora.load_peft(lora_spec.init_from, model_cfg, mesh, rules)
        lora_spec = lora.with_trainable(lora_spec, peft)
        log(f"LoRA adapters from {lora_spec.init_from}: rank {model_cfg.lora_rank}, alpha {model_cfg.lora_alpha:g}, "
            f"on {', '.join(model_cfg.lora_targets)}")
    elif lora_spec:
        model_cfg = lora.adapted_config(model_cfg, lora_spec)

    B, mb = micro_batching(cfg)
    specs = task.models(cfg, model_cfg) if task.models else None
    policy = next(iter(specs)) if specs else None
    graphdef, params_abs, tx, lr_fn, shardings = state_spec(cfg, task, model_cfg, specs, mesh, rules, lora_spec)
    frozen = frozen_base(lora_spec, cfg, model_cfg, specs, mesh, rules) if lora_spec else None

    ckpt = checkpoint.RunCheckpoints(cfg.run_dir, cfg.checkpoint.max_to_keep, cfg.checkpoint.async_save)
    it = pipeline.Batches(train_data, B, seed=cfg.seed, shuffle=cfg.data.shuffle, packing=cfg.data.packing,
                          buckets=cfg.data.buckets, process_index=jax.process_index(),
                          process_count=jax.process_count())
    data_state = None
    if start is not None:
        state, data_state = ckpt.restore(start, state_lib.abstract_state(tx, params_abs, shardings))
        it.restore(data_state["iterator"])
    else:
        start = 0
        _write_run_files(cfg, model_cfg, tok_dir, lora_spec)
        if specs and lora_spec:
            params = {k: lora.init_trainable(mc, frozen[k], lora_spec, mesh, rules, cfg.seed + i)
                      for i, (k, (mc, _)) in enumerate(specs.items())}
            if peft is not None:  # a loaded adapter is the policy's
                params[policy] = lora.combine(params[policy], peft)
        elif specs:
            params = {k: initial_params(cfg, mc, mesh, rules, source=src) for k, (mc, src) in specs.items()}
        elif lora_spec:
            params = lora.init_trainable(model_cfg, frozen, lora_spec, mesh, rules, cfg.seed)
            if peft is not None:
                params = lora.combine(params, peft)
        else:
            params = initial_params(cfg, model_cfg, mesh, rules)
        state = state_lib.init_state(tx, params, shardings, cfg.seed)

    # With LoRA the frozen base doubles as the reference model (no second copy of the weights).
    base = (frozen[policy] if specs else frozen) if lora_spec else None
    aux = task.setup(cfg, model_cfg, graphdef, mesh, rules, [d for d in (train_data, eval_data) if d],
                     log, base=base) if task.setup else None
    ref_is_base, step_aux = split_base_reference(aux, base)
    step_fn = jax.jit(make_train_step(task, graphdef, tx, lr_fn, cfg, B // mb, ref_is_base),
                      out_shardings=(shardings, None), donate_argnums=0)
    rollout = task.make_rollout(cfg, model_cfg, graphdef, mesh, rules, tokenizer, log, base=base) \
        if task.make_rollout else None
    if rollout is not None and data_state is not None and "rollout" in data_state:
        rollout.restore(data_state["rollout"])
    eval_fn = jax.jit(make_eval_step(task, graphdef, cfg))
    full = lambda params: full_params(graphdef, params, frozen)

    def run_eval(params):
        if rollout is not None:
            return rollout.evaluate(full(params), eval_data)
        return evaluate(eval_fn, full(params), eval_data, cfg, task, mesh, rules, aux)

    writer = metrics_lib.MetricsWriter(cfg.run_dir, resume_step=start or None)
    peak = metrics_lib.peak_flops(cfg.train.peak_flops)
    n_dev = len(jax.devices())
    last, eval_metrics = {}, {}

    from tqdm import tqdm
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not cfg.train.progress or jax.process_index() != 0,
               mininterval=1.0, dynamic_ncols=True, unit="step")
    window, tokens, flops, rollout_s, t0 = [], 0, 0.0, 0.0, time.time()
    nonfinite_run, step = 0, start
    if eval_data is not None and cfg.train.eval_before and start == 0:
        eval_metrics = run_eval(state["params"])
        writer.write(0, eval_metrics)
        log("before training: " + ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()))
    try:
        while step < cfg.train.steps:
            t_rollout = time.time()
            host = next(it) if rollout is None else rollout(it, full(state["params"]), step)
            rollout_s += time.time() - t_rollout  # host arrays: the rollout's device work is done
            T = host_len(host)
            tokens += real_tokens(host) * jax.process_count()
            flops += metrics_lib.train_flops_per_token(model_cfg, T) * host_rows(host) * jax.process_count() * T
            with jax.set_mesh(mesh):
                state, report = step_fn(state, device_batch(host, task, mesh, rules), step_aux, frozen)
            step += 1
            window.append(report)
            nonfinite_run = nonfinite_run + 1 if float(report["nonfinite"]) else 0
            if nonfinite_run >= cfg.train.max_nonfinite_steps:
                raise NonFiniteError(f"{nonfinite_run} consecutive steps with a non-finite loss or gradient "
                                     f"(last at step {step}); the last checkpoint holds finite parameters")
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                elapsed = max(time.time() - t0, 1e-9)
                last = {k: float(np.mean([float(r[k]) for r in window])) for k in window[-1]}
                last["nonfinite"] = float(sum(float(r["nonfinite"]) for r in window))
                last["tokens_per_sec"] = tokens / elapsed
                last["step_time"] = elapsed / len(window)
                last["tflops_per_sec_per_device"] = flops / elapsed / n_dev / 1e12
                if peak:
                    last["mfu"] = flops / elapsed / n_dev / peak
                if rollout is not None:  # generation, scoring and rollout log-probs, as a share of wall time
                    last["rollout_share"] = rollout_s / elapsed
                writer.write(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_sec']:.0f}")
                window, tokens, flops, rollout_s, t0 = [], 0, 0.0, 0.0, time.time()
            bar.update(1)
            if eval_data is not None and cfg.train.eval_every and (
                    step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                eval_metrics = run_eval(state["params"])
                writer.write(step, eval_metrics)
                log(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()))
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
                extra = {"rollout": rollout.state()} if rollout is not None else {}
                ckpt.save(step, state, {"iterator": it.state(), "step": step, **extra})
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    if task.finish is not None and step == cfg.train.steps:
        model_cfg = task.finish(cfg, model_cfg, graphdef, full(state["params"]), [train_data, eval_data], mesh,
                                rules, log)
        _write_run_files(cfg, model_cfg, tok_dir, lora_spec)
    pick = (lambda t: t[policy]) if specs else (lambda t: t)
    if cfg.checkpoint.export_hf and step == cfg.train.steps:
        export_hf(cfg.run_dir, model_cfg, pick(graphdef), pick(full(state["params"])), mesh, rules)
        if lora_spec:
            lora.save_peft(model_cfg, pick(state["params"]), os.path.join(cfg.run_dir, "adapter"),
                           base_name=cfg.init_from or cfg.model.path, dropout=lora_spec.dropout)
    return RunResult(cfg.run_dir, step, last, eval_metrics, state["params"], model_cfg, graphdef, mesh, frozen,
                     rules)


def frozen_base(s, cfg, model_cfg, specs, mesh, rules):
    """The frozen base of a LoRA run in lora.base_dtype (int8: bf16 loaded, then quantised kernel by kernel);
    for multi-model tasks, one view per model of the same arrays (a critic's has no LM head)."""
    dtype = "bfloat16" if s.base_dtype == "int8" else s.base_dtype
    base_cfg = model_cfg.without_lora().replace(param_dtype=dtype)
    base = initial_params(cfg, base_cfg, mesh, rules)
    if model_cfg.quantized:
        base = lora.quantize(base, model_cfg, mesh, rules)
    if not specs:
        return base
    return {k: {n: v for n, v in base.items() if n in nnx.to_pure_dict(models.abstract_params(mc)[1])}
            for k, (mc, _) in specs.items()}


def host_len(host: dict) -> int:
    return max(v.shape[1] for k, v in host.items() if isinstance(v, np.ndarray) and k.endswith("input_ids"))


def load_tokenizer(cfg):
    """(tokenizer directory, tokenizer) of a config: tokenizer.path, else the model it starts from."""
    tok_dir = pipeline.tokenizer_dir(cfg)
    if not tok_dir:
        raise JaxalignError("tokenizer.path is not set (and there is no model.path to take it from)")
    return tok_dir, templates.load_tokenizer(tok_dir, cfg.tokenizer.chat_template or None)


def micro_batching(cfg):
    B = cfg.train.batch_size
    mb = cfg.train.micro_batch_size or B
    if B % mb:
        raise JaxalignError(f"train.batch_size {B} is not a multiple of train.micro_batch_size {mb}")
    return B, mb


def state_spec(cfg, task, model_cfg, specs, mesh, rules, lora_spec=None):
    """(graphdef, abstract params, optimizer, lr schedule, state shardings) of a run: nothing allocated.
    With `specs` (multi-model tasks) graphdefs and params are dicts by model name."""
    if specs:
        graphdef, params_abs, params_sh = {}, {}, {}
        for name, (mc, _) in specs.items():
            graphdef[name], params_abs[name], params_sh[name] = _abstract(mc, mesh, rules)
    else:
        graphdef, params_abs, params_sh = _abstract(model_cfg, mesh, rules)
    s = lora_spec or lora.spec(cfg)
    if s:  # only the adapters (and trained extras) are optimised and checkpointed
        sub = lambda t: lora.trainable(t, s)
        each = (lambda t: {k: sub(v) for k, v in t.items()}) if specs else sub
        params_abs, params_sh = each(params_abs), each(params_sh)
    tx, lr_fn = (task.optimizer or (lambda c, n, _: make_optimizer(c.optim, n)))(cfg, cfg.train.steps, params_abs)
    return graphdef, params_abs, tx, lr_fn, state_lib.state_shardings(tx, params_abs, params_sh, mesh)


def _abstract(model_cfg, mesh, rules):
    """(graphdef, abstract params, param shardings) of one model, as pure dicts."""
    graphdef, abs_state = models.abstract_params(model_cfg)
    return (graphdef, nnx.to_pure_dict(abs_state),
            nnx.to_pure_dict(mesh_lib.param_shardings(abs_state, mesh, rules)))


def host_rows(host: dict) -> int:
    """Sequences in a host batch (chosen + rejected for pairs, generations for RL)."""
    return sum(v.shape[0] for k, v in host.items() if isinstance(v, np.ndarray) and k.endswith("input_ids"))


def real_tokens(host: dict) -> int:
    return int(sum(v.sum() for k, v in host.items() if isinstance(v, np.ndarray) and k.endswith("attention_mask")))


def export_hf(run_dir, model_cfg, graphdef, params, mesh, rules):
    """The policy as an HF checkpoint in run_dir/hf (with LoRA: merged, in the frozen base's dtype)."""
    if model_cfg.lora_rank or model_cfg.quantized:
        model_cfg, params = lora.merge(model_cfg, params)
        model_cfg = model_cfg.replace(param_dtype=str(params["embed"].dtype))
    lm = models.LM(model_cfg, graphdef, params, mesh, rules, source=run_dir)
    lm.save_pretrained(os.path.join(run_dir, "hf"), overwrite=True)


def read_metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
