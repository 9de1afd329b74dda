"""LoRA (Hu et al. 2021) for every trainer: adapters on chosen Linear modules, a frozen (optionally bf16 or
int8) base, and merge. The math only: no file I/O (PEFT's adapter files: jaxalign.convert.peft; a LoRA run
directory's loading: jaxalign.loading).

The adapted model is the ordinary decoder built from a ModelConfig whose `lora_rank`/`lora_targets` are set:
each targeted Linear gains lora_a [*in, r] and lora_b [r, *out] (logical axes of its kernel, so they shard
like it), and computes x W + (alpha / r) (x A) B. Training splits the params in two pure dicts:

    trainable = adapters (+ optional extras: `lora.trainable` regex, and a scalar head always)
    frozen    = the base model's weights, untouched (the reference policy for DPO/KTO/GRPO/PPO, for free)

Only `trainable` is differentiated, held by the optimizer and saved in checkpoints; `combine` overlays it on
`frozen` inside the step. Parameter paths are "/"-joined pure-dict keys: "layers/q/kernel", "lm_head/kernel".
"""
import dataclasses
import functools
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import JaxalignError
from jaxalign.models import abstract_params
from jaxalign.models.config import ModelConfig
from jaxalign.models.transformer import CausalLM
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.tree import keystr, tree_has_path

ADAPTER_KEYS = ("lora_a", "lora_b")
BASE_DTYPES = ("bfloat16", "float32", "float16", "int8")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: str          # regex searched in each Linear kernel's path ("layers/q/kernel", "lm_head/kernel")
    trainable: str        # regex of extra parameter paths trained in full (e.g. "norm"); "" = none
    base_dtype: str       # the frozen base's storage: bfloat16 | float32 | float16 | int8 (weight-only)
    init_from: str        # a PEFT adapter directory (or a LoRA run with its adapter/ export) to start from


def spec(cfg) -> Optional[LoraSpec]:
    """The run's LoRA settings (`lora.*`), or None when lora.rank is 0."""
    c = cfg.lora
    if not c.rank:
        return None
    if c.rank < 0 or c.alpha <= 0 or not 0 <= c.dropout < 1:
        raise JaxalignError(f"lora: rank must be > 0, alpha > 0 and 0 <= dropout < 1 (got rank={c.rank}, "
                            f"alpha={c.alpha}, dropout={c.dropout})")
    if c.base_dtype not in BASE_DTYPES:
        raise JaxalignError(f"lora.base_dtype={c.base_dtype!r}: expected one of {BASE_DTYPES}")
    for field in ("targets", "trainable"):
        try:
            re.compile(c[field])
        except re.error as e:
            raise JaxalignError(f"lora.{field}={c[field]!r}: not a regular expression ({e})") from None
    return LoraSpec(int(c.rank), float(c.alpha), float(c.dropout), c.targets, c.trainable, c.base_dtype,
                    c.init_from)


def linear_modules(model_cfg: ModelConfig) -> list:
    """Module paths of the Linear layers LoRA can adapt (every kernel but the scalar head's)."""
    pure = nnx.to_pure_dict(abstract_params(model_cfg.without_lora())[1])
    paths = [keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)]
    return [p[: -len("/kernel")] for p in paths if p.endswith("/kernel") and not p.startswith("score/")]


def adapted_config(model_cfg: ModelConfig, s: LoraSpec) -> ModelConfig:
    """`model_cfg` with adapters on every Linear whose kernel path matches `s.targets`."""
    modules = linear_modules(model_cfg)
    targets = tuple(m for m in modules if re.search(s.targets, f"{m}/kernel"))
    if not targets:
        raise JaxalignError(f"lora.targets={s.targets!r} matches no Linear kernel; the model has: "
                            + ", ".join(f"{m}/kernel" for m in modules))
    return model_cfg.replace(lora_rank=s.rank, lora_alpha=s.alpha, lora_targets=targets,
                             quantized=s.base_dtype == "int8")


def is_trainable(path: str, s: Optional[LoraSpec]) -> bool:
    """Adapters, the scalar head (a reward/value head is new to the base), and `lora.trainable` matches."""
    if path.endswith("kernel_scale"):
        return False
    if path.rsplit("/", 1)[-1] in ADAPTER_KEYS or path.startswith("score/"):
        return True
    return bool(s and s.trainable and re.search(s.trainable, path))


def with_trainable(s: LoraSpec, tree: dict) -> LoraSpec:
    """`s` with the non-adapter leaves of `tree` (a loaded adapter's modules_to_save) trained as well."""
    paths = [keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    extra = [re.escape(p) for p in paths if not is_trainable(p, s)]
    if not extra:
        return s
    pattern = "^(" + "|".join(extra) + ")$"
    return dataclasses.replace(s, trainable=f"{s.trainable}|{pattern}" if s.trainable else pattern)


def select(tree: dict, keep) -> dict:
    """The nested sub-dict of leaves whose path satisfies keep(path_str)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = select(v, lambda p, k=k: keep(f"{k}/{p}"))
            if sub:
                out[k] = sub
        elif keep(str(k)):
            out[k] = v
    return out


def trainable(tree: dict, s: Optional[LoraSpec]) -> dict:
    return select(tree, lambda p: is_trainable(p, s))


def combine(frozen: dict, train: dict) -> dict:
    """`frozen` with `train`'s leaves laid over it (adapters added, trained extras replacing the originals).
    A pure dict operation: no arrays are copied."""
    out = dict(frozen)
    for k, v in train.items():
        out[k] = combine(frozen.get(k, {}), v) if isinstance(v, dict) else v
    return out


def reference_config(model_cfg: ModelConfig, params: dict) -> ModelConfig:
    """The config of a frozen model's params: no adapters; quantised when its kernels are int8."""
    quantized = any(keystr(p).endswith("kernel_scale") for p, _ in jax.tree_util.tree_leaves_with_path(params))
    return model_cfg.without_lora().replace(quantized=quantized)


@functools.lru_cache(maxsize=32)
def _graphdef(model_cfg: ModelConfig):
    return abstract_params(model_cfg)[0]


def reference_graphdef(model_cfg: ModelConfig, params: dict):
    """The graphdef to run frozen `params` with (the base of a LoRA model, or a separately loaded copy)."""
    return _graphdef(reference_config(model_cfg, params))


# ------------------------------------------------------------------------------------ quantisation

def quantize(params: dict, quant_cfg: ModelConfig, mesh, rules) -> dict:
    """Block Linear kernels of `params` as int8 + kernel_scale (symmetric, one float32 scale per output
    channel: max |w| over the input dims / 127), sharded as `quant_cfg`'s abstract params. One kernel at a
    time, each donated, so peak memory stays near the input's."""
    _, abs_state = abstract_params(quant_cfg.without_lora().replace(quantized=True))
    shardings = nnx.to_pure_dict(mesh_lib.param_shardings(abs_state, mesh, rules))
    abstract = nnx.to_pure_dict(abs_state)
    out = dict(params, layers=dict(params["layers"]))
    for name, mod in abstract["layers"].items():
        if "kernel_scale" not in mod:
            continue
        in_axes = tuple(range(1, mod["kernel"].ndim - mod["kernel_scale"].ndim + 1))  # kernel [L, *in, *out]

        def q(w, in_axes=in_axes):
            w32 = w.astype(jnp.float32)
            scale = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True) / 127.0
            scale = jnp.where(scale > 0, scale, 1.0)
            return jnp.round(w32 / scale).astype(jnp.int8), jnp.squeeze(scale, in_axes)

        sh = shardings["layers"][name]
        kernel, scale = jax.jit(q, out_shardings=(sh["kernel"], sh["kernel_scale"]), donate_argnums=0)(
            out["layers"][name]["kernel"])
        out["layers"][name] = {**out["layers"][name], "kernel": kernel, "kernel_scale": scale}
    return out


def dequantize_kernel(w, scale):
    """int8 kernel [L, *in, *out] times its scale [L, *out], in float32."""
    return w.astype(jnp.float32) * jnp.expand_dims(scale, tuple(range(1, w.ndim - scale.ndim + 1)))


# -------------------------------------------------------------------------------------------- merge

def delta(a, b, n_lead: int):
    """A [*lead, *in, r] @ B [*lead, r, *out] -> [*lead, *in, *out], float32 (without alpha/r)."""
    lead, ins, outs, r = a.shape[:n_lead], a.shape[n_lead:-1], b.shape[n_lead + 1:], a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*lead, math.prod(ins), r)
    b2 = b.astype(jnp.float32).reshape(*lead, r, math.prod(outs))
    return jnp.matmul(a2, b2).reshape(*lead, *ins, *outs)


@functools.partial(jax.jit, static_argnames=("scale", "n_lead", "dtype"))
def _fold(w, w_scale, a, b, scale, n_lead, dtype):
    w = dequantize_kernel(w, w_scale) if w_scale is not None else w.astype(jnp.float32)
    if a is not None:
        w = w + scale * delta(a, b, n_lead)
    return w.astype(dtype)


def merge(model_cfg: ModelConfig, params: dict, dtype=None) -> tuple:
    """(base config, params with (alpha/r) A B folded into every adapted kernel and int8 kernels dequantised),
    computed in float32 and written in `dtype` (default: each kernel's own dtype; bfloat16 for int8)."""
    scale = model_cfg.lora_scale

    def fold(p, n_lead):
        if "kernel" not in p:
            return {k: fold(v, n_lead or int(k == "layers")) if isinstance(v, dict) else v for k, v in p.items()}
        w = p["kernel"]
        kind = jnp.dtype(dtype or (jnp.bfloat16 if w.dtype == jnp.int8 else w.dtype))
        out = {k: v for k, v in p.items() if k not in ADAPTER_KEYS + ("kernel_scale",)}
        out["kernel"] = _fold(w, p.get("kernel_scale"), p.get("lora_a"), p.get("lora_b"), scale, n_lead, kind)
        return out

    return model_cfg.without_lora(), fold(params, 0)


# ---------------------------------------------------------------------------------- initial adapters

def init_trainable(model_cfg: ModelConfig, frozen: dict, s: Optional[LoraSpec], mesh, rules, seed: int) -> dict:
    """Fresh adapters (A ~ U(+-1/sqrt(in)), B = 0) created in their sharding, plus copies of the trained
    extras from the base (a trained head the base lacks, such as a critic's, is initialised fresh), in the
    model's param dtype."""
    in_frozen = lambda p: tree_has_path(frozen, p)
    fresh = lambda p: p.rsplit("/", 1)[-1] in ADAPTER_KEYS or (is_trainable(p, s) and not in_frozen(p))
    _, abs_state = abstract_params(model_cfg)
    shardings = select(nnx.to_pure_dict(mesh_lib.param_shardings(abs_state, mesh, rules)), fresh)

    def make(key):  # XLA drops the base weights' initialisation: only adapters (and a new head) are outputs
        return select(nnx.to_pure_dict(nnx.state(CausalLM(model_cfg, nnx.Rngs(key)))), fresh)

    with jax.set_mesh(mesh):
        adapters = jax.jit(make, out_shardings=shardings)(jax.random.key(seed))
    extras = select(frozen, lambda p: is_trainable(p, s))
    extras = jax.tree.map(lambda x: x.astype(model_cfg.weights_dtype), extras)
    return combine(extras, adapters)
