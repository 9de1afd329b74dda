"""Configs as Python (docs/DESIGN.md §6): a recipe file's `get_config()` returns an ml_collections ConfigDict
that is merged onto the base skeleton below; `--config.a.b=value` overrides any field. A field that the
skeleton does not have is an error naming it, never a silent no-op.
"""
import ast
import importlib.util
import os

import ml_collections
from ml_collections.config_dict import placeholder

from jaxalign import JaxalignError
from jaxalign.train import registry

def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.run_dir = ""
    c.seed = 0
    c.model = dict(path="", preset="", dtype="float32", param_dtype="float32", remat="none",
                   attention_impl=placeholder(str))
    c.tokenizer = dict(path="", chat_template="")
    c.data = dict(
        train_files="", eval_files="", max_length=1024, max_prompt_length=placeholder(int),
        truncation="truncate", packing=False, on_error="raise", buckets=placeholder(tuple), shuffle=True,
        num_proc=1, cache_dir="")
    c.mesh = dict(shape=(1, -1, 1), rules=placeholder(tuple))
    # Multi-host: explicit coordinator (else JAXALIGN_* environment, else TPU/SLURM/MPI auto-detection).
    c.distributed = dict(coordinator_address="", num_processes=0, process_id=-1, timeout_s=300)
    # XLA flags (jaxalign/parallel/xla_flags.py): "recommended" per platform | "none"; extra ones appended as is.
    # device_memory_gib (what nvidia-smi shows, in GiB: H200 140.4, H100 80GB 79.1) x memory_fraction (XLA's
    # allocator share, XLA_PYTHON_CLIENT_MEM_FRACTION) is what `--dry-run` checks the compiled step against;
    # 0 = the device's own limit. dry_run_target: compile the
    # dry run for a GPU this machine does not have ("h200", "h100x8"; needs jax[cuda12], not a GPU).
    c.runtime = dict(xla_flags="recommended", extra_xla_flags="", device_memory_gib=0.0, memory_fraction=0.9,
                     dry_run_target="")
    c.optim = dict(lr=1e-5, schedule="cosine", warmup_steps=0, weight_decay=0.0, clip_norm=1.0, b1=0.9,
                   b2=0.999, eps=1e-8)
    c.train = dict(steps=100, batch_size=8, micro_batch_size=placeholder(int), eval_every=0, eval_batches=0, eval_before=False,
                   log_every=10, max_nonfinite_steps=10, logprob_chunk=128, peak_flops=0.0, progress=True)
    c.checkpoint = dict(every=0, max_to_keep=3, export_hf=False, async_save=True)
    c.init_from = ""
    # LoRA (jaxalign/lora.py): rank 0 = full fine-tuning. targets/trainable are regexes searched in parameter
    # paths ("layers/q/kernel", "final_norm/scale"); the frozen base is stored in base_dtype (int8 = weight-only
    # quantised); init_from = a PEFT adapter directory to continue from.
    c.lora = dict(rank=0, alpha=16.0, dropout=0.0, targets=r"layers/(q|k|v|o|gate|up|down)/kernel", trainable="",
                  base_dtype="bfloat16", init_from="")
    # Each task's own section, with the defaults its file declares (train/task.py).
    for name, task in registry.TASKS.items():
        if task.defaults is not None:
            c[name] = dict(task.defaults)
    return c


def _merge(base, user, where, prefix=""):
    for key in user.keys():
        name = prefix + key
        if key not in base:
            raise JaxalignError(f"{where}: unknown config field {name!r}")
        value = user[key]
        if isinstance(base[key], ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise JaxalignError(f"{where}: config field {name!r} is a section, got {value!r}")
            _merge(base[key], value, where, name + ".")
        else:
            _set(base, key, value, where, name)


def _set(section, key, value, where, name):
    if isinstance(value, list):
        value = tuple(value)
    try:
        section[key] = value
    except (TypeError, ValueError) as e:
        raise JaxalignError(f"{where}: config field {name!r}: {e}") from None


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    return value


def apply_overrides(cfg, overrides, where="--config"):
    """`a.b=value` strings (the `--config.` prefix already removed)."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep:
            raise JaxalignError(f"{where}.{item}: expected --config.FIELD=VALUE")
        *sections, key = path.split(".")
        node = cfg
        for s in sections:
            if s not in node or not isinstance(node[s], ml_collections.ConfigDict):
                raise JaxalignError(f"{where}.{path}: unknown config field {path!r}")
            node = node[s]
        if key not in node or isinstance(node[key], ml_collections.ConfigDict):
            raise JaxalignError(f"{where}.{path}: unknown config field {path!r}")
        try:
            value = _parse_value(text, node[key])
        except ValueError as e:
            raise JaxalignError(f"{where}.{path}: {e}") from None
        _set(node, key, value, where, path)
    return cfg


def load_config(path: str, overrides=(), arg=None) -> ml_collections.ConfigDict:
    """Load a recipe file (`get_config()` or `get_config(arg)` for `file.py:arg`), check it against the
    skeleton and apply overrides."""
    if ":" in os.path.basename(path) and arg is None:
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise JaxalignError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location("jaxalign_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise JaxalignError(f"{path}: defines no get_config()")
    user = module.get_config(arg) if arg is not None else module.get_config()
    cfg = base_config()
    _merge(cfg, user, path)
    apply_overrides(cfg, overrides)
    try:
        check(cfg)
    except JaxalignError as e:
        raise JaxalignError(f"{path}: {e}") from None
    return cfg


def check(cfg):
    """The checks that need no data and no weights: the task exists, its own check (its section's fields),
    and the batch arithmetic. `load_config` runs them, so a bad field fails before anything is read."""
    task = registry.get_task(cfg.task)
    if cfg.train.micro_batch_size and cfg.train.batch_size % cfg.train.micro_batch_size:
        raise JaxalignError(f"train.batch_size {cfg.train.batch_size} is not a multiple of "
                            f"train.micro_batch_size {cfg.train.micro_batch_size}")
    if task.check is not None:
        task.check(cfg)
    return task
