"""HF checkpoints (config.json + safetensors, single or sharded with an index) <-> jaxalign params.

Both directions stream tensor by tensor: reading places each HF tensor straight into its target sharding
(host memory: about one tensor); writing gathers one tensor at a time and appends its bytes to the
safetensors file whose header was planned up front. No torch at run time. Exports are atomic: they are
written to a temporary sibling directory and renamed into place only when complete.
"""
import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Optional

import jax
import ml_dtypes  # noqa: F401  (numpy bfloat16 for safetensors' numpy path)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open

from jaxalign import JaxalignError
from jaxalign.models import gpt2, llama
from jaxalign.models.config import ModelConfig
from jaxalign.parallel.mesh import to_host
from jaxalign.tree import tree_get, tree_set

FAMILIES = {t: fam for fam in (llama, gpt2) for t in fam.MODEL_TYPES}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tensors some HF checkpoints carry that no model needs (buffers saved by old transformers versions).
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def family(model_type: str):
    if model_type not in FAMILIES:
        raise JaxalignError(f"unknown model_type {model_type!r}: supported {sorted(FAMILIES)}")
    return FAMILIES[model_type]


# ------------------------------------------------------------------------------------------ config

def read_json(path: str) -> dict:
    """A JSON object from `path`, or a JaxalignError naming the file and line."""
    if not os.path.isfile(path):
        raise JaxalignError(f"{path}: not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise JaxalignError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise JaxalignError(f"{path}: expected a JSON object")
    return data


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise JaxalignError(f"{path}: not found (expected an HF model directory)")
    return read_json(path)


def config_from_hf(hf_dir: str, **runtime) -> ModelConfig:
    h = read_hf_config(hf_dir)
    if "model_type" not in h:
        raise JaxalignError(f"{hf_dir}/config.json: field 'model_type' is missing")
    fam = family(h["model_type"])
    if runtime.get("param_dtype") is None:
        stored = h.get("dtype") or h.get("torch_dtype") or "float32"
        runtime["param_dtype"] = stored if stored in ST_DTYPES else "float32"
    runtime = {k: v for k, v in runtime.items() if v is not None}
    try:
        cfg = fam.config_from_hf(h, **runtime)
        if cfg.num_labels and "reward_mean" in h:
            cfg = cfg.replace(reward_mean=float(h["reward_mean"]), reward_std=float(h["reward_std"]))
        return cfg
    except KeyError as e:
        raise JaxalignError(f"{hf_dir}/config.json: field {e.args[0]!r} is missing") from None
    except (ValueError, TypeError) as e:
        raise JaxalignError(f"{hf_dir}/config.json: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict:
    fam = family(cfg.model_type)
    h = fam.config_to_hf(cfg)
    h["architectures"] = [fam.architecture(cfg)]
    h["dtype"] = cfg.param_dtype
    if cfg.num_labels:
        h["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        h["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        if (cfg.reward_mean, cfg.reward_std) != (0.0, 1.0):
            h["reward_mean"], h["reward_std"] = cfg.reward_mean, cfg.reward_std
    return h


# ------------------------------------------------------------------------------------------ reading

class SafetensorsDir:
    """The tensors of an HF directory, one file opened at a time on demand; names mapped via the index."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            self.files = read_json(index).get("weight_map")
            if not isinstance(self.files, dict):
                raise JaxalignError(f"{index}: field 'weight_map' is missing or not an object")
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            self.files = {n: SINGLE for n in self._open(SINGLE).keys()}
        else:
            bins = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))]
            hint = " (pickle checkpoints are not loaded: convert them to safetensors)" if bins else ""
            raise JaxalignError(f"{hf_dir}: no {SINGLE} or {INDEX}{hint}")
        self._handles = {}

    def _open(self, fname):
        path = os.path.join(self.dir, fname)
        try:
            return safe_open(path, framework="np")
        except Exception as e:  # safetensors raises its own error types for corrupt headers/truncation
            raise JaxalignError(f"{path}: cannot read safetensors file ({e})") from None

    def handle(self, name):
        fname = self.files[name]
        if fname not in self._handles:
            self._handles.clear()  # keep one file open: shards are read in order
            self._handles[fname] = self._open(fname)
        return self._handles[fname]

    def _read(self, name, what):
        try:
            return what(self.handle(name))
        except JaxalignError:
            raise
        except Exception as e:  # e.g. an index that names the wrong shard, a truncated file
            path = os.path.join(self.dir, self.files[name])
            raise JaxalignError(f"{path}: tensor {name!r} cannot be read ({e})") from None

    def shape(self, name):
        return tuple(self._read(name, lambda h: h.get_slice(name).get_shape()))

    def get(self, name) -> np.ndarray:
        return self._read(name, lambda h: h.get_tensor(name))


def _validate(st: SafetensorsDir, specs, hf_dir):
    names = {s.name for s in specs}
    missing = [n for n in names if n not in st.files]
    if missing:
        raise JaxalignError(f"{hf_dir}: tensor {sorted(missing)[0]!r} is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for s in specs:
        got = st.shape(s.name)
        if got != tuple(s.shape):
            raise JaxalignError(f"{hf_dir}: tensor {s.name!r} has shape {list(got)}, "
                                f"the config implies {list(s.shape)}")
    unused = sorted(n for n in st.files if n not in names and not IGNORED.match(n))
    return unused


def _put(array: np.ndarray, sharding):
    """A host array onto devices, each device (on any host) taking only its slice."""
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


_set_layer = jax.jit(lambda stack, layer, i: stack.at[i].set(layer), donate_argnums=0)


def load_hf_params(hf_dir: str, cfg: ModelConfig, target: dict, log=print) -> dict:
    """Read an HF checkpoint into a pure dict of params laid out as `target` (a pure dict of
    ShapeDtypeStructs with shardings). Stacked layer params are filled one layer at a time in place."""
    st = SafetensorsDir(hf_dir)
    specs = family(cfg.model_type).hf_tensors(cfg)
    unused = _validate(st, specs, hf_dir)
    if unused:
        log(f"warning: {len(unused)} tensors of {hf_dir} are not used: {', '.join(unused[:5])}"
            + (" ..." if len(unused) > 5 else ""))
    out = {}
    for spec in specs:
        parts = spec.to_ours(st.get(spec.name))
        for path, part in zip(spec.paths, parts):
            t = tree_get(target, path)
            part = np.asarray(part, dtype=t.dtype)
            if spec.layer is None:
                tree_set(out, path, _put(part, t.sharding))
                continue
            layer_sharding = NamedSharding(t.sharding.mesh, P(*tuple(t.sharding.spec)[1:]))
            try:
                stack = tree_get(out, path)
            except KeyError:
                stack = jax.jit(lambda: jax.numpy.zeros(t.shape, t.dtype), out_shardings=t.sharding)()
            tree_set(out, path, _set_layer(stack, _put(part, layer_sharding), spec.layer))
    return out


# ------------------------------------------------------------------------------------------ writing

def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise JaxalignError(f"max_shard_size {size!r}: expected e.g. 5GB, 500MB or a byte count")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "B").lower()])


_take_layer = jax.jit(lambda stack, i: stack[i])


def _hf_array(spec, params):
    parts = []
    for path in spec.paths:
        x = tree_get(params, path)
        parts.append(to_host(x if spec.layer is None else _take_layer(x, spec.layer)))
    return np.ascontiguousarray(spec.to_hf(*parts))


def _plan_shards(specs, itemsize, max_bytes):
    shards, current, size = [], [], 0
    for s in specs:
        nbytes = int(np.prod(s.shape)) * itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(s)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _write_safetensors(path, specs, dtype: np.dtype, produce):
    """Write one safetensors file: header from the planned shapes, then each tensor as `produce` yields it."""
    header, offset = {}, 0
    for s in specs:
        nbytes = int(np.prod(s.shape)) * dtype.itemsize
        header[s.name] = {"dtype": ST_DTYPES[dtype.name], "shape": list(s.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            arr = produce(s)
            if arr.shape != tuple(s.shape) or arr.dtype != dtype:
                raise RuntimeError(f"{s.name}: produced {arr.shape} {arr.dtype}, planned {s.shape} {dtype}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # no bytes copy (bf16 has no buffer protocol)


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False):
    """Yield a temporary directory next to `out_dir`; on success it replaces `out_dir`, on failure it
    is removed and `out_dir` is untouched."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise JaxalignError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def copy_tokenizer(src: Optional[str], dst: str):
    if not src or not os.path.isdir(src):
        return
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def save_hf(cfg: ModelConfig, params: dict, out_dir: str, *, max_shard_size="5GB", tokenizer_dir=None,
            overwrite=False, log=print):
    """Write `params` (pure dict) as an HF checkpoint in the params' dtype. Every process must call this
    (gathers are collective); only process 0 writes files."""
    specs = family(cfg.model_type).hf_tensors(cfg)
    dtype = np.dtype(cfg.weights_dtype)
    shards = _plan_shards(specs, dtype.itemsize, parse_size(max_shard_size))
    write = jax.process_index() == 0
    if cfg.num_labels and cfg.lm_head and write:
        log("note: exporting as *ForSequenceClassification; the LM head is not part of that format")
    produce = lambda s: _hf_array(s, params).astype(dtype, copy=False)
    ctx = atomic_dir(out_dir, overwrite) if write else contextlib.nullcontext(None)
    with ctx as tmp:
        names = [SINGLE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for fname, shard in zip(names, shards):
            if write:
                _write_safetensors(os.path.join(tmp, fname), shard, dtype, produce)
            else:
                for s in shard:
                    produce(s)  # take part in the collective gathers
        if not write:
            return
        if len(shards) > 1:
            total = sum(int(np.prod(s.shape)) * dtype.itemsize for s in specs)
            index = {"metadata": {"total_size": total},
                     "weight_map": {s.name: f for f, shard in zip(names, shards) for s in shard}}
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg), f, indent=2, sort_keys=True)
        copy_tokenizer(tokenizer_dir, tmp)
