"""PEFT's LoRA adapter format (adapter_config.json + adapter_model.safetensors) <-> jaxalign adapters.

`save_peft` writes the adapters (and trained extras, as PEFT's modules_to_save) of a LoRA model so that
peft.PeftModel.from_pretrained loads them on the transformers model; `load_peft` reads such a directory
(or a finished jaxalign LoRA run's adapter/ export) onto a mesh. Tensor names and layouts come from the HF
layouts of convert/hf.py; the LoRA math stays in jaxalign.lora.
"""
import json
import math
import os

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxalign import JaxalignError
from jaxalign.convert import hf
from jaxalign.lora import ADAPTER_KEYS
from jaxalign.models import abstract_params
from jaxalign.models.config import ModelConfig
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.parallel.mesh import to_host
from jaxalign.tree import keystr, tree_get_path, tree_has_path, tree_set_path

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _peft_modules(base_cfg: ModelConfig):
    """{our module path: [(HF module name, layer or None, HFTensor)]} for single-kernel Linear tensors, and
    the HF tensor specs by our parameter path (for modules_to_save)."""
    linear, by_path = {}, {}
    for t in hf.family(base_cfg.model_type).hf_tensors(base_cfg):
        for path in t.paths:
            by_path.setdefault("/".join(path), []).append(t)
        if len(t.paths) == 1 and t.paths[0][-1] == "kernel":
            linear.setdefault("/".join(t.paths[0][:-1]), []).append((t.name[: -len(".weight")], t.layer, t))
    return linear, by_path


def _fused_error(base_cfg, module):
    return JaxalignError(f"{base_cfg.model_type}: {module} is part of a fused HF tensor (GPT-2's c_attn), which "
                         f"PEFT adapts as one matrix; train q/k/v adapters only on LLaMA-family models to export "
                         f"them, or target o/up/down")


def save_peft(model_cfg: ModelConfig, params: dict, out_dir: str, *, base_name: str = "", dropout: float = 0.0,
              overwrite: bool = True):
    """Write the adapters (and trained extras, as PEFT's modules_to_save) of `params` in PEFT's format:
    adapter_config.json + adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained on the
    transformers model. Every process calls it (gathers are collective); process 0 writes."""
    base_cfg = model_cfg.without_lora()
    linear, by_path = _peft_modules(base_cfg)
    r = model_cfg.lora_rank
    tensors, targets, modules_to_save = {}, set(), set()
    for module in model_cfg.lora_targets:
        if module not in linear:
            raise _fused_error(base_cfg, module)
        mod = tree_get_path(params, module)
        a_all, b_all = to_host(mod["lora_a"]), to_host(mod["lora_b"])
        for name, layer, _ in linear[module]:
            a, b = (a_all, b_all) if layer is None else (a_all[layer], b_all[layer])
            tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T, np.float32)
            tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T, np.float32)
            targets.add(name.rsplit(".", 1)[-1])
    for p, v in jax.tree_util.tree_leaves_with_path(params):
        path = keystr(p)
        if path.rsplit("/", 1)[-1] in ADAPTER_KEYS:
            continue
        for t in by_path.get(path, []):
            x = to_host(v)
            tensors[f"base_model.model.{t.name}"] = np.ascontiguousarray(
                t.to_hf(x if t.layer is None else x[t.layer])).astype(np.float32)
            modules_to_save.add(t.name.rsplit(".", 1)[0])
    if jax.process_index() != 0:
        return
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS" if base_cfg.num_labels else "CAUSAL_LM",
              "base_model_name_or_path": base_name, "r": r, "lora_alpha": model_cfg.lora_alpha,
              "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
              "fan_in_fan_out": base_cfg.model_type == "gpt2", "modules_to_save": sorted(modules_to_save) or None,
              "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    with hf.atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, PEFT_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, PEFT_CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def is_peft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PEFT_CONFIG))


def load_peft(adapter_dir: str, base_cfg: ModelConfig, mesh, rules) -> tuple:
    """(adapted config, trainable params) from a PEFT LoRA adapter directory, onto `mesh`. Layers without an
    adapter get zeros (no change); rsLoRA's alpha/sqrt(r) scale is kept exactly (as an equivalent alpha)."""
    if not is_peft_dir(adapter_dir) and is_peft_dir(os.path.join(adapter_dir, "adapter")):
        adapter_dir = os.path.join(adapter_dir, "adapter")  # a finished jaxalign LoRA run
    where = os.path.join(adapter_dir, PEFT_CONFIG)
    c = hf.read_json(where)
    if c.get("peft_type", "LORA") != "LORA":
        raise JaxalignError(f"{where}: peft_type {c.get('peft_type')!r}: only LORA adapters are supported")
    for field in ("use_dora", "rank_pattern", "alpha_pattern"):
        if c.get(field):
            raise JaxalignError(f"{where}: field {field!r} is set; jaxalign supports plain LoRA (one rank and "
                                f"alpha for all modules, no DoRA)")
    if c.get("bias", "none") != "none":
        raise JaxalignError(f"{where}: field 'bias' is {c['bias']!r}; only 'none' is supported")
    r, alpha = int(c["r"]), float(c["lora_alpha"])
    if c.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r) = (alpha*sqrt(r))/r
    path = os.path.join(adapter_dir, PEFT_WEIGHTS)
    if not os.path.isfile(path):
        raise JaxalignError(f"{adapter_dir}: {PEFT_WEIGHTS} not found (jaxalign reads safetensors only, "
                            f"never pickled adapter_model.bin)")
    with safe_open(path, "numpy") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    linear, by_path = _peft_modules(base_cfg)
    targets = tuple(m for m, entries in linear.items()
                    if any(f"base_model.model.{n}.lora_A.weight" in stored for n, _, _ in entries))
    if not targets:
        raise JaxalignError(f"{path}: no LoRA tensor matches a {base_cfg.model_type} Linear module "
                            f"(expected names like base_model.model.{next(iter(linear.values()))[0][0]}.lora_A.weight)")
    adapted = base_cfg.replace(lora_rank=r, lora_alpha=alpha, lora_targets=targets)
    _, abs_state = abstract_params(adapted)
    abstract = nnx.to_pure_dict(abs_state)
    shardings = nnx.to_pure_dict(mesh_lib.param_shardings(abs_state, mesh, rules))
    out, used = {}, set()
    for module in targets:
        mod_abs = tree_get_path(abstract, module)
        a = np.zeros(mod_abs["lora_a"].shape, np.float32)
        b = np.zeros(mod_abs["lora_b"].shape, np.float32)
        for name, layer, _ in linear[module]:
            ka, kb = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
            if ka not in stored:
                continue
            sa, sb = (a.shape, b.shape) if layer is None else (a.shape[1:], b.shape[1:])
            want_a, want_b = (r, math.prod(sa[:-1])), (math.prod(sb[1:]), r)
            for key, want in ((ka, want_a), (kb, want_b)):
                if key not in stored or stored[key].shape != want:
                    got = list(stored[key].shape) if key in stored else "missing"
                    raise JaxalignError(f"{path}: tensor {key!r} is {got}, the base model implies {list(want)}")
            va, vb = stored[ka].T.reshape(sa), stored[kb].T.reshape(sb)
            if layer is None:
                a, b = va, vb
            else:
                a[layer], b[layer] = va, vb
            used.update((ka, kb))
        sh = tree_get_path(shardings, module)
        leaf = {"lora_a": hf._put(a.astype(mod_abs["lora_a"].dtype), sh["lora_a"]),
                "lora_b": hf._put(b.astype(mod_abs["lora_b"].dtype), sh["lora_b"])}
        tree_set_path(out, module, leaf)
    for key, value in stored.items():  # modules_to_save: trained copies of base tensors
        if key in used:
            continue
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        specs = [(p, t) for p, ts in by_path.items() for t in ts if t.name == name and len(t.paths) == 1]
        if not specs:
            raise JaxalignError(f"{path}: tensor {key!r} matches no parameter of the base model")
        p, t = specs[0]
        target = tree_get_path(abstract, p)
        x = np.asarray(t.to_ours(value)[0], np.float32)
        if t.layer is not None:
            full = tree_get_path(out, p) if tree_has_path(out, p) else np.zeros(target.shape, np.float32)
            full[t.layer] = x
            x = full
        tree_set_path(out, p, x)
    out = _to_devices(out, abstract, shardings)
    return adapted, out


def _to_devices(tree, abstract, shardings, prefix=""):
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out[k] = _to_devices(v, abstract, shardings, p)
        elif isinstance(v, np.ndarray):
            t = tree_get_path(abstract, p)
            out[k] = hf._put(v.astype(t.dtype), tree_get_path(shardings, p))
        else:
            out[k] = v
    return out
