"""Everything a run needs before its first step, gathered once: `build(cfg, task)`.

Training (loop.py), `--dry-run` (dryrun.py) and the benchmarks call the same `build`. It makes the mesh and
rules, loads the tokenizer, works out the model config, runs the checks that need it or the devices (see
`preflight`: each refusal is one `JaxalignError`, before data is tokenised or any weights load), tokenises
the data, completes the model config (the task's head, LoRA adapters, a loaded PEFT adapter), the model
slots (one model, or a dict by name for multi-model tasks), the optimizer and every sharding; with `abstract=False` it also loads the frozen LoRA base. Nothing else is allocated: the
train state is made (or restored) by the loop.
"""
import dataclasses
import json
import os
from typing import Any, Optional

import jax
from flax import nnx

from jaxalign import JaxalignError, lora, loading
from jaxalign.convert import hf, peft
from jaxalign.data import pipeline, templates
from jaxalign.models import abstract_params
from jaxalign.models.presets import get_preset
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train.preflight import check_batch_divides, check_lengths, check_sources, warn_host_memory
from jaxalign.train import state as state_lib
from jaxalign.train.optim import make_optimizer


@dataclasses.dataclass
class Run:
    cfg: Any
    task: Any
    log: Any
    mesh: Any
    rules: tuple
    tok_dir: str
    tokenizer: Any
    train_data: Any
    eval_data: Any
    model_cfg: Any = None            # the policy's config (with LoRA: adapted)
    lora_spec: Any = None
    peft: Optional[dict] = None      # adapters loaded from lora.init_from
    specs: Optional[dict] = None     # multi-model tasks: {name: (model config, source)}
    graphdef: Any = None             # a dict by name for multi-model tasks
    params_abs: Any = None           # abstract trained params (LoRA: adapters and trained extras only)
    tx: Any = None
    lr_fn: Any = None
    shardings: Any = None            # of the train state
    frozen: Any = None               # LoRA: the frozen base (per model for multi-model tasks), else None
    batch_size: int = 0
    n_micro: int = 1

    @property
    def policy(self) -> Optional[str]:
        return next(iter(self.specs)) if self.specs else None

    def pick(self, tree):
        """The policy's entry of a per-model tree (the tree itself for single-model tasks)."""
        return tree[self.policy] if self.specs else tree

    @property
    def base(self):
        """With LoRA, the policy's frozen base (it doubles as the reference model), else None."""
        return self.pick(self.frozen) if self.frozen is not None else None

    @property
    def datasets(self) -> list:
        return [d for d in (self.train_data, self.eval_data) if d is not None]

    def train_batches(self):
        """The run's training batches (this process's rows of each), in the order the steps read them."""
        c = self.cfg
        return pipeline.Batches(self.train_data, self.batch_size, seed=c.seed, shuffle=c.data.shuffle,
                                packing=c.data.packing, buckets=c.data.buckets, process_index=jax.process_index(),
                                process_count=jax.process_count())

    def eval_batches(self, data=None):
        """(batches, how many to read) of one eval pass over `data` (default the eval set): the last batch filled
        with weight-0 rows, train.eval_batches of them when set."""
        c = self.cfg
        it = pipeline.Batches(self.eval_data if data is None else data, c.train.batch_size, shuffle=False, epochs=1,
                              drop_last=False, buckets=c.data.buckets, process_index=jax.process_index(),
                              process_count=jax.process_count())
        return it, c.train.eval_batches or it.batches_per_epoch()

    def compose(self, params, frozen):
        """The params a model runs with: with LoRA, the trained ones laid over the frozen base."""
        if frozen is None:
            return params
        if self.specs:
            return {k: lora.combine(frozen[k], params[k]) for k in self.specs}
        return lora.combine(frozen, params)

    def full(self, params):
        return self.compose(params, self.frozen)

    def initial_params(self) -> dict:
        """The trained params of step 0: loaded or fresh (LoRA: new adapters, or the loaded PEFT ones)."""
        cfg, mesh, rules = self.cfg, self.mesh, self.rules
        if self.lora_spec:
            def adapters(mc, frozen, seed):
                return lora.init_trainable(mc, frozen, self.lora_spec, mesh, rules, seed)
            if self.specs:
                params = {k: adapters(mc, self.frozen[k], cfg.seed + i)
                          for i, (k, (mc, _)) in enumerate(self.specs.items())}
            else:
                params = adapters(self.model_cfg, self.frozen, cfg.seed)
            if self.peft is not None:  # a loaded adapter is the policy's
                return {**params, self.policy: lora.combine(params[self.policy], self.peft)} if self.specs \
                    else lora.combine(params, self.peft)
            return params
        if self.specs:
            return {k: initial_params(cfg, mc, mesh, rules, source=src) for k, (mc, src) in self.specs.items()}
        return initial_params(cfg, self.model_cfg, mesh, rules)


def build(cfg, task, abstract: bool = False, log=print, devices=None) -> Run:
    """The run of `cfg` for `task` (see the module docstring) on `devices` (default: all). `abstract` (what
    `--dry-run` needs): nothing is loaded (the frozen LoRA base stays shapes and shardings, a PEFT adapter to
    continue from is not read), and a mesh these devices cannot form leaves run.mesh None (and no shardings)."""
    if task.check is not None:
        task.check(cfg)
    batch_size, micro = micro_batching(cfg)
    check_sources(cfg)
    try:
        mesh = mesh_lib.make_mesh(cfg.mesh.shape, devices)
    except mesh_lib.MeshError:
        if not abstract:
            raise
        mesh = None
    if mesh is not None:
        check_batch_divides(cfg, task, mesh)
    tok_dir, tokenizer = load_tokenizer(cfg)
    run = Run(cfg, task, log, mesh, mesh_lib.normalize_rules(cfg.mesh.rules), tok_dir, tokenizer, None, None,
              batch_size=batch_size, n_micro=batch_size // micro)
    run.model_cfg = model_config(cfg, tokenizer)
    check_lengths(cfg, task, run.model_cfg)
    if cfg.optim.warmup_steps and cfg.optim.warmup_steps >= cfg.train.steps:
        log(f"warning: optim.warmup_steps {cfg.optim.warmup_steps} >= train.steps {cfg.train.steps}: the warmup "
            f"is cut to {max(cfg.train.steps - 1, 0)} steps and optim.lr is reached only on the last step")
    run.train_data = pipeline.prepare_from_config(cfg, "train", tokenizer, kind=task.data_kind, log=log)
    if run.train_data is None:
        raise JaxalignError("data.train_files is not set")
    run.eval_data = pipeline.prepare_from_config(cfg, "eval", tokenizer, kind=task.data_kind, log=log)
    if task.model_config:
        run.model_cfg = task.model_config(run)
    run.lora_spec = lora.spec(cfg)
    if run.lora_spec and run.lora_spec.init_from and not abstract:
        run.model_cfg, run.peft = peft.load_peft(run.lora_spec.init_from, run.model_cfg, run.mesh, run.rules)
        run.lora_spec = lora.with_trainable(run.lora_spec, run.peft)
        mc = run.model_cfg
        log(f"LoRA adapters from {run.lora_spec.init_from}: rank {mc.lora_rank}, alpha {mc.lora_alpha:g}, "
            f"on {', '.join(mc.lora_targets)}")
    elif run.lora_spec:
        run.model_cfg = lora.adapted_config(run.model_cfg, run.lora_spec)
    run.specs = task.models(run) if task.models else None
    if mesh is None:
        return run
    warn_host_memory(cfg, task, run.model_cfg, mesh, log)
    state_spec(run)
    if run.lora_spec:
        run.frozen = abstract_base(run) if abstract else frozen_base(run)
    return run


def state_spec(run: Run):
    """Graphdefs, abstract params, optimizer, lr schedule and state shardings of a run: nothing allocated."""
    if run.specs:
        parts = {name: _abstract(mc, run.mesh, run.rules) for name, (mc, _) in run.specs.items()}
        run.graphdef, params_abs, params_sh = ({k: v[i] for k, v in parts.items()} for i in range(3))
    else:
        run.graphdef, params_abs, params_sh = _abstract(run.model_cfg, run.mesh, run.rules)
    if run.lora_spec:  # only the adapters (and trained extras) are optimised and checkpointed
        sub = lambda t: lora.trainable(t, run.lora_spec)
        each = (lambda t: {k: sub(v) for k, v in t.items()}) if run.specs else sub
        params_abs, params_sh = each(params_abs), each(params_sh)
    run.params_abs = params_abs
    run.tx, run.lr_fn = run.task.optimizer(run, params_abs) if run.task.optimizer else \
        make_optimizer(run.cfg.optim, run.cfg.train.steps)
    run.shardings = state_lib.state_shardings(run.tx, params_abs, params_sh, run.mesh)


def _abstract(model_cfg, mesh, rules):
    """(graphdef, abstract params, param shardings) of one model, as pure dicts."""
    graphdef, abs_state = abstract_params(model_cfg)
    return (graphdef, nnx.to_pure_dict(abs_state),
            nnx.to_pure_dict(mesh_lib.param_shardings(abs_state, mesh, rules)))


def _base_config(run: Run):
    dtype = "bfloat16" if run.lora_spec.base_dtype == "int8" else run.lora_spec.base_dtype
    return run.model_cfg.without_lora().replace(param_dtype=dtype)


def _per_model(run: Run, base: dict):
    """For multi-model tasks, one view per model of the same base arrays (a critic's has no LM head)."""
    if not run.specs:
        return base
    return {k: {n: v for n, v in base.items() if n in nnx.to_pure_dict(abstract_params(mc)[1])}
            for k, (mc, _) in run.specs.items()}


def frozen_base(run: Run):
    """The frozen base of a LoRA run in lora.base_dtype (int8: bf16 loaded, then quantised kernel by kernel)."""
    base = initial_params(run.cfg, _base_config(run), run.mesh, run.rules)
    if run.model_cfg.quantized:
        base = lora.quantize(base, run.model_cfg, run.mesh, run.rules)
    return _per_model(run, base)


def abstract_base(run: Run):
    """The frozen base as it will be stored (bf16, or int8 kernels with their scales), abstract."""
    _, state = abstract_params(_base_config(run).replace(quantized=run.model_cfg.quantized))
    return _per_model(run, mesh_lib.abstract_with_shardings(
        nnx.to_pure_dict(state), nnx.to_pure_dict(mesh_lib.param_shardings(state, run.mesh, run.rules))))


def model_config(cfg, tokenizer):
    """The model's config: from model.path / init_from, or a preset sized to the tokenizer (from scratch;
    `tokenizer` None: the preset as it is)."""
    runtime = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                   attention_impl=cfg.model.attention_impl)
    source = cfg.init_from or cfg.model.path
    n_tokens = len(tokenizer) if tokenizer is not None else 0  # None: no vocabulary fitting (preflight)
    if source:
        model_cfg = loading.load_config(source, **runtime)
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
    if tokenizer is None:
        return model_cfg
    # From scratch: the embedding fits the tokenizer (padded to a multiple of 64 for tidy sharding).
    return model_cfg.replace(vocab_size=-(-n_tokens // 64) * 64, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def initial_params(cfg, model_cfg, mesh, rules, source=None) -> dict:
    """Starting params: from `source` (default init_from or model.path) or a fresh init. Parameters the
    task's model does not have (an LM head under a reward model) are left out."""
    source = source or cfg.init_from or cfg.model.path
    if source:
        lm = loading.from_pretrained(source, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, mesh=mesh,
                                     rules=rules, num_labels=model_cfg.num_labels or None)
    else:
        lm = loading.from_config(model_cfg, mesh, rules, seed=cfg.seed)
    wanted = nnx.to_pure_dict(abstract_params(model_cfg)[1])
    return {k: v for k, v in lm.pure_params().items() if k in wanted}


def reference_params(run: Run, source=None):
    """A frozen reference model's params: with LoRA and no explicit `source`, the base the adapters sit on
    (the same arrays: no second copy); otherwise `source` (default: the starting model) loaded anew."""
    if run.base is not None and not source:
        return run.base
    return initial_params(run.cfg, run.model_cfg.without_lora(), run.mesh, run.rules, source=source)


def split_base_reference(aux, base):
    """(whether aux["ref"] is the LoRA base itself, aux without it then): see step.make_train_step."""
    if base is not None and isinstance(aux, dict) and aux.get("ref") is base:
        return True, {k: v for k, v in aux.items() if k != "ref"}
    return False, aux


def write_run_files(run: Run, model_cfg=None):
    """The resolved config, the model config, the LoRA run file and the tokenizer, into the run directory."""
    if jax.process_index() != 0:
        return
    cfg, run_dir = run.cfg, run.cfg.run_dir
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(run_dir, loading.NATIVE_CONFIG), "w") as f:
        f.write((model_cfg or run.model_cfg).to_json())
    if run.lora_spec:  # how to rebuild the model: the base it sits on (checkpoints hold the adapters alone)
        base = cfg.init_from or cfg.model.path
        with open(os.path.join(run_dir, loading.LORA_RUN_FILE), "w") as f:
            json.dump({"base": os.path.abspath(base) if base and os.path.isdir(base) else base,
                       **dataclasses.asdict(run.lora_spec)}, f, indent=2, sort_keys=True)
    hf.copy_tokenizer(run.tok_dir, run_dir)


def load_tokenizer(cfg):
    """(tokenizer directory, tokenizer) of a config: tokenizer.path, else the model it starts from."""
    tok_dir = pipeline.tokenizer_dir(cfg)
    if not tok_dir:
        raise JaxalignError("tokenizer.path is not set (and there is no model.path to take it from)")
    return tok_dir, templates.load_tokenizer(tok_dir, cfg.tokenizer.chat_template or None)


def preflight(cfg, task, devices=None):
    """The checks of `build` that read nothing but config files (no tokenizer, data or weights): the task's
    fields, the model, adapter and tokenizer directories exist, the mesh fits `devices` and splits every
    batch, the sequence lengths fit the model's positions. `loop.train` runs them before it creates the run
    directory, so a config they refuse leaves nothing behind."""
    if task.check is not None:
        task.check(cfg)
    micro_batching(cfg)
    check_sources(cfg)
    check_batch_divides(cfg, task, mesh_lib.make_mesh(cfg.mesh.shape, devices))
    check_lengths(cfg, task, model_config(cfg, None))


def micro_batching(cfg):
    B = cfg.train.batch_size
    mb = cfg.train.micro_batch_size or B
    if B % mb:
        raise JaxalignError(f"train.batch_size {B} is not a multiple of train.micro_batch_size {mb}")
    return B, mb
