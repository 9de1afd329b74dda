"""ModelConfig: one frozen, hashable description of every supported decoder (LLaMA family and GPT-2).

It is static under `jax.jit` (hashable) and round-trips through JSON (`to_dict`/`from_dict`).
"""
import dataclasses
import json
import math
from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str                      # llama | mistral | qwen2 | gpt2 (the HF model_type it exports to)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm: str = "rms"                    # rms | layer
    norm_eps: float = 1e-6
    activation: str = "silu"             # silu | gelu | gelu_tanh | relu
    gated_mlp: bool = True               # SwiGLU (LLaMA) vs fc -> act -> proj (GPT-2)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    position: str = "rope"               # rope | learned
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs of HF's rope parameters, e.g. llama3
    layer_windows: tuple = ()            # per-layer sliding window (0 = full attention); () = all full
    tie_word_embeddings: bool = False
    lm_head: bool = True                 # False for a model imported from *ForSequenceClassification
    num_labels: int = 0                  # 1 = scalar (reward/value) head `score`
    # Reward normalisation measured after RM training (rm.normalize_reward): reward = (score - mean) / std.
    # The raw `score` head is untouched (HF's *ForSequenceClassification gives the raw score).
    reward_mean: float = 0.0
    reward_std: float = 1.0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None  # int or tuple of ints
    pad_token_id: Optional[int] = None
    initializer_range: float = 0.02
    # LoRA (jaxalign/lora.py): adapters lora_a [*in, r], lora_b [r, *out] on the Linear modules named in
    # lora_targets (module paths such as "layers/q"); y = x W + (alpha / r) * (x A) B. Rank 0 = none.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple = ()
    # Frozen block weights stored as int8 with a float32 scale per output channel (weight-only quantisation).
    quantized: bool = False
    # Runtime choices (not architecture): compute dtype, parameter dtype, rematerialisation, attention kernel.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"                  # none | full | dots
    attention_impl: Optional[str] = None  # None (XLA's choice) | xla | cudnn (GPU) | splash (TPU)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (int, float, bool, str) and not _is_type(value, f.type):
                raise ValueError(f"field {f.name!r} must be {f.type.__name__}, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
        for name in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def without_lora(self) -> "ModelConfig":
        """The base model's config: no adapters, no quantisation."""
        return self.replace(lora_rank=0, lora_alpha=0.0, lora_targets=(), quantized=False)

    @property
    def rope_parameters(self) -> dict:
        return dict(self.rope_scaling or ())

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_parameters or None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        d = dict(d)
        d["rope_scaling"] = freeze_dict(d.get("rope_scaling"))
        d["layer_windows"] = tuple(d.get("layer_windows") or ())
        d["lora_targets"] = tuple(d.get("lora_targets") or ())
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def num_params(self) -> int:
        """Parameter count (embeddings included), from the shapes alone."""
        D, F, L = self.hidden_size, self.intermediate_size, self.num_layers
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = D * (q + 2 * kv) + q * D + (q + 2 * kv) * self.qkv_bias + D * self.o_bias
        mlp = D * F * (3 if self.gated_mlp else 2) + (F * (2 if self.gated_mlp else 1) + D) * self.mlp_bias
        norms = 2 * D * (2 if self.norm == "layer" else 1)
        total = L * (attn + mlp + norms) + self.vocab_size * D + D * (2 if self.norm == "layer" else 1)
        total += self.max_position_embeddings * D if self.position == "learned" else 0
        total += self.vocab_size * D if self.lm_head and not self.tie_word_embeddings else 0
        return total + D * self.num_labels


def _is_type(value, kind) -> bool:
    """JSON-ish type check: an int is a float, a bool is not a number."""
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


def freeze_dict(d):
    """A dict (possibly nested in lists) as a hashable tuple of sorted pairs; None stays None."""
    if not d:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


class HFTensor(NamedTuple):
    """One tensor of an HF checkpoint and where it lives in jaxalign's params.

    `paths`: our parameter paths it maps to (GPT-2's fused c_attn maps to three); `layer`: index into the
    stacked `layers` dim, or None; `to_ours(array) -> tuple of arrays`; `to_hf(*arrays) -> array`.
    """
    name: str
    paths: tuple
    layer: Optional[int]
    shape: tuple
    to_ours: Callable
    to_hf: Callable


def linear_tensor(name, path, layer, in_shape, out_shape, transposed=True) -> HFTensor:
    """A torch Linear weight [out, in] (or, `transposed=False`, GPT-2's Conv1D [in, out]) as our kernel
    [*in_shape, *out_shape]."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if transposed:
        return HFTensor(name, (path,), layer, (n_out, n_in),
                        lambda w: (w.T.reshape(*in_shape, *out_shape),),
                        lambda k: k.reshape(n_in, n_out).T)
    return HFTensor(name, (path,), layer, (n_in, n_out),
                    lambda w: (w.reshape(*in_shape, *out_shape),),
                    lambda k: k.reshape(n_in, n_out))


def plain_tensor(name, path, layer, shape, our_shape=None) -> HFTensor:
    """A tensor stored the same way on both sides (up to a reshape)."""
    our_shape = tuple(our_shape or shape)
    return HFTensor(name, (path,), layer, tuple(shape), lambda w: (w.reshape(our_shape),),
                    lambda k: k.reshape(shape))
