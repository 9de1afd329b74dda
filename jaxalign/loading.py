"""Loading models: the user-facing LM object and from_pretrained / from_config.

    lm = jaxalign.loading.from_pretrained(hf_dir, dtype=jnp.bfloat16, mesh=None)  # HF or jaxalign dir
    logits = lm(input_ids, attention_mask=None)                                   # [B, T, V]
    lm.save_pretrained(out_dir)                                                    # HF layout
    lm.config, lm.graphdef, lm.params                                              # what a trainer uses

A jaxalign model directory (`jaxalign convert --from-hf`, `lm.save`) holds `jaxalign_config.json`, an
Orbax `params/` checkpoint (fast sharded restore on any mesh) and the tokenizer files. A training run
directory holds `jaxalign_config.json` and `checkpoints/<step>/`; loading it takes the latest step's params.
A LoRA run directory also holds `lora.json` (LORA_RUN_FILE): it loads as its base with the run's latest
adapters merged.

This module sits above models (Flax modules), lora (LoRA math), convert (HF and PEFT files) and checkpoint
(Orbax), and below train/ and sampling/.
"""
import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxalign import JaxalignError, checkpoint, lora
from jaxalign.convert import hf, peft
from jaxalign.models import CausalLM, ModelConfig, abstract_params
from jaxalign.models.layers import Linear
from jaxalign.parallel import mesh as mesh_lib

NATIVE_CONFIG = "jaxalign_config.json"
LORA_RUN_FILE = "lora.json"  # in a LoRA run directory: the base model and the adapter settings
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl")

__all__ = ["LM", "from_pretrained", "from_config", "load_config", "NATIVE_CONFIG", "LORA_RUN_FILE",
           "RUNTIME_FIELDS"]


def _dtype_name(d) -> Optional[str]:
    return None if d is None else jnp.dtype(d).name


def _target(cfg, mesh, rules):
    graphdef, abs_state = abstract_params(cfg)
    shardings = mesh_lib.param_shardings(abs_state, mesh, rules)
    target = mesh_lib.abstract_with_shardings(nnx.to_pure_dict(abs_state), nnx.to_pure_dict(shardings))
    return graphdef, abs_state, target


def _as_state(abs_state, pure: dict):
    nnx.replace_by_pure_dict(abs_state, pure)
    return abs_state


@functools.partial(jax.jit, static_argnames=("graphdef", "rules"))
def _forward(graphdef, params, input_ids, attention_mask, positions, segment_ids, rules):
    with mesh_lib.use_rules(rules):
        return nnx.merge(graphdef, params)(input_ids, attention_mask, positions=positions,
                                           segment_ids=segment_ids)


@dataclasses.dataclass
class LM:
    config: ModelConfig
    graphdef: Any
    params: Any                      # nnx.State or its pure dict; leaves are (sharded) jax arrays
    mesh: Mesh
    rules: tuple = mesh_lib.DEFAULT_RULES
    source: Optional[str] = None     # directory it was loaded from (tokenizer files are copied from it)

    def module(self) -> CausalLM:
        return nnx.merge(self.graphdef, self.params)

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions,
                 "segment_ids": segment_ids}
        batch = mesh_lib.shard_batch({k: v for k, v in batch.items() if v is not None}, self.mesh, self.rules)
        with jax.set_mesh(self.mesh):
            return _forward(self.graphdef, self.params, batch["input_ids"], batch.get("attention_mask"),
                            batch.get("positions"), batch.get("segment_ids"), self.rules)

    def pure_params(self) -> dict:
        return self.params if isinstance(self.params, dict) else nnx.to_pure_dict(self.params)

    def save_pretrained(self, out_dir: str, *, max_shard_size="5GB", tokenizer_dir=None, overwrite=False):
        """HF layout: config.json + (sharded) safetensors in the params' dtype, tokenizer files copied."""
        hf.save_hf(self.config, self.pure_params(), out_dir, max_shard_size=max_shard_size,
                   tokenizer_dir=tokenizer_dir or self.source, overwrite=overwrite)

    def save(self, out_dir: str, *, tokenizer_dir=None, overwrite=False):
        """jaxalign layout: jaxalign_config.json + Orbax params/ (+ tokenizer files)."""
        def write(d):
            checkpoint.save_params(os.path.join(d, "params"), self.pure_params())
            if jax.process_index() == 0:
                with open(os.path.join(d, NATIVE_CONFIG), "w") as f:
                    f.write(self.config.to_json())
                hf.copy_tokenizer(tokenizer_dir or self.source, d)

        if jax.process_count() == 1:
            with hf.atomic_dir(out_dir, overwrite) as tmp:
                write(tmp)
        else:  # every host writes its shards into the same path; Orbax commits atomically
            write(out_dir)


def _default_mesh(mesh):
    return mesh if mesh is not None else mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])


def from_config(cfg: ModelConfig, mesh: Optional[Mesh] = None, rules=None, seed: int = 0) -> LM:
    """A randomly initialised model, created directly in its sharding."""
    mesh, rules = _default_mesh(mesh), mesh_lib.normalize_rules(rules)
    graphdef, state = mesh_lib.init_sharded(lambda rngs: CausalLM(cfg, rngs), mesh, rules, seed)
    return LM(cfg, graphdef, state, mesh, rules)


def _init_score_head(cfg: ModelConfig, mesh, rules, seed: int = 0) -> dict:
    """A fresh scalar head alone (initialising a whole model for it would cost a whole model's memory)."""
    head = lambda rngs: Linear((cfg.hidden_size,), (cfg.num_labels,), ("embed",), ("labels",), bias=False,
                               dtype=cfg.weights_dtype, rngs=rngs, std=cfg.initializer_range)
    return nnx.to_pure_dict(mesh_lib.init_sharded(head, mesh, rules, seed)[1])


def load_config(path: str, **runtime) -> ModelConfig:
    """The ModelConfig of an HF or jaxalign model directory, with runtime fields overridden."""
    runtime = {k: v for k, v in runtime.items() if v is not None}
    native = os.path.join(path, NATIVE_CONFIG)
    if not os.path.isfile(native):
        return hf.config_from_hf(path, **runtime)
    try:  # a LoRA run loads merged: its model is the base architecture
        return ModelConfig.from_dict(hf.read_json(native)).without_lora().replace(**runtime)
    except (ValueError, TypeError) as e:
        raise JaxalignError(f"{native}: {e}") from None


def from_pretrained(path: str, *, dtype=None, param_dtype=None, mesh: Optional[Mesh] = None, rules=None,
                    remat: Optional[str] = None, attention_impl: Optional[str] = None,
                    num_labels: Optional[int] = None, adapter: Optional[str] = None, log=print) -> LM:
    """Load an HF directory (config.json + safetensors) or a jaxalign model directory onto `mesh`
    (default: one device), each tensor streamed into its target sharding.

    dtype: compute dtype (default float32); param_dtype: default = the checkpoint's dtype (bf16 stays bf16).
    num_labels=1 adds a freshly initialised scalar head (reward/value model) when the checkpoint has none.
    adapter: a PEFT LoRA directory merged into the loaded weights. A jaxalign LoRA run directory loads as
    its base with the run's latest adapters merged.
    """
    if not os.path.isdir(path):
        raise JaxalignError(f"{path}: model directory not found")
    kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, remat=remat,
              attention_impl=attention_impl, num_labels=num_labels, log=log)
    if adapter is not None or os.path.isfile(os.path.join(path, LORA_RUN_FILE)):
        return _with_adapters(path, adapter, kw)
    mesh, rules = _default_mesh(mesh), mesh_lib.normalize_rules(rules)
    cfg = load_config(path, dtype=_dtype_name(dtype), param_dtype=_dtype_name(param_dtype), remat=remat,
                      attention_impl=attention_impl)
    add_head = bool(num_labels) and cfg.num_labels != num_labels
    base_cfg = cfg
    if add_head:
        cfg = cfg.replace(num_labels=num_labels)
    graphdef, abs_state, target = _target(base_cfg, mesh, rules)
    if os.path.isfile(os.path.join(path, NATIVE_CONFIG)):
        params_dir = os.path.join(path, "params")
        if os.path.isdir(params_dir):
            pure = checkpoint.restore_params(params_dir, target)
        elif checkpoint.latest_run_step(path) is not None:  # a training run directory
            pure = checkpoint.restore_run_params(path, target)
        else:
            raise JaxalignError(f"{path}: has no params/ or checkpoints/ (incomplete jaxalign directory)")
    else:
        with jax.set_mesh(mesh):
            pure = hf.load_hf_params(path, base_cfg, target, log=log)
    if add_head:
        pure["score"] = _init_score_head(cfg, mesh, rules)
        graphdef, abs_state, _ = _target(cfg, mesh, rules)
    return LM(cfg, graphdef, _as_state(abs_state, pure), mesh, rules, source=path)


def _with_adapters(path: str, adapter: Optional[str], kw: dict) -> LM:
    """A base model with LoRA adapters merged in: a PEFT directory (`adapter`) or a jaxalign LoRA run."""
    if adapter is None:  # a LoRA run directory: its base, and the adapters of its latest checkpoint
        info = hf.read_json(os.path.join(path, LORA_RUN_FILE))
        if not info.get("base"):
            raise JaxalignError(f"{path}: this LoRA run started from a random init (model.preset); its base "
                                f"weights were never saved, so the adapters cannot be loaded without them")
        base = from_pretrained(info["base"], **kw)
        adapted = ModelConfig.from_dict(hf.read_json(os.path.join(path, NATIVE_CONFIG))).replace(
            **{k: getattr(base.config, k) for k in RUNTIME_FIELDS if k != "param_dtype"})  # adapters as trained
        _, abs_state = abstract_params(adapted)
        s = lora.LoraSpec(**{k: v for k, v in info.items() if k != "base"})
        shardings = lora.trainable(nnx.to_pure_dict(mesh_lib.param_shardings(abs_state, base.mesh, base.rules)), s)
        target = mesh_lib.abstract_with_shardings(lora.trainable(nnx.to_pure_dict(abs_state), s), shardings)
        trained = checkpoint.restore_run_params(path, target)
    else:
        if not peft.is_peft_dir(adapter):
            raise JaxalignError(f"{adapter}: not a PEFT adapter directory ({peft.PEFT_CONFIG} not found)")
        base = from_pretrained(path, **kw)
        adapted, trained = peft.load_peft(adapter, base.config, base.mesh, base.rules)
    cfg, params = lora.merge(adapted, lora.combine(base.pure_params(), trained), dtype=base.config.weights_dtype)
    return LM(cfg, abstract_params(cfg)[0], params, base.mesh, base.rules, source=path)
