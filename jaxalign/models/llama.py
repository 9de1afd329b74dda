"""LLaMA family (Llama 2, Llama 3/3.1/3.2, Mistral, Qwen2): HF config and weight layout.

One implementation (transformer.CausalLM), configured: grouped-query attention, RoPE with `llama3` or
`linear` scaling, tied embeddings (Llama 3.2 1B/3B), Qwen2's q/k/v biases, Mistral/Qwen2 sliding windows.
"""
from jaxalign.models.config import ModelConfig, freeze_dict, linear_tensor, plain_tensor

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def rope_from_hf(h: dict):
    """(theta, scaling) from transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(h.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", h.get("rope_theta", 10000.0)))
    params.update(h.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    params["rope_type"] = kind
    params.pop("type", None)
    return theta, freeze_dict(params)


def layer_windows(h: dict, num_layers: int) -> tuple:
    mt = h["model_type"]
    if mt == "mistral" and h.get("sliding_window"):
        return (int(h["sliding_window"]),) * num_layers
    if mt == "qwen2" and h.get("use_sliding_window") and h.get("sliding_window"):
        types = h.get("layer_types") or ["sliding_attention" if i >= h.get("max_window_layers", 28)
                                         else "full_attention" for i in range(num_layers)]
        return tuple(int(h["sliding_window"]) if t == "sliding_attention" else 0 for t in types)
    return ()


def num_labels(h: dict) -> int:
    return len(h["id2label"]) if h.get("id2label") else int(h.get("num_labels", 2))


def config_from_hf(h: dict, **runtime) -> ModelConfig:
    mt = h["model_type"]
    D, N = h["hidden_size"], h["num_attention_heads"]
    L = h["num_hidden_layers"]
    act = h.get("hidden_act", "silu")
    if act not in ACT_FROM_HF:
        raise ValueError(f"hidden_act {act!r} is not supported")
    theta, scaling = rope_from_hf(h)
    seq_cls = any(a.endswith("ForSequenceClassification") for a in h.get("architectures") or ())
    bias = bool(h.get("attention_bias", False))
    eos = h.get("eos_token_id")
    return ModelConfig(
        model_type=mt, vocab_size=h["vocab_size"], hidden_size=D, intermediate_size=h["intermediate_size"],
        num_layers=L, num_heads=N, num_kv_heads=h.get("num_key_value_heads") or N,
        head_dim=h.get("head_dim") or D // N, max_position_embeddings=h.get("max_position_embeddings", 2048),
        norm="rms", norm_eps=h.get("rms_norm_eps", 1e-6), activation=ACT_FROM_HF[act], gated_mlp=True,
        qkv_bias=(mt == "qwen2") or bias, o_bias=bias, mlp_bias=bool(h.get("mlp_bias", False)),
        position="rope", rope_theta=theta, rope_scaling=scaling, layer_windows=layer_windows(h, L),
        tie_word_embeddings=bool(h.get("tie_word_embeddings", False)),
        lm_head=not seq_cls, num_labels=num_labels(h) if seq_cls else 0,
        bos_token_id=h.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=h.get("pad_token_id"), initializer_range=h.get("initializer_range", 0.02), **runtime)


def config_to_hf(cfg: ModelConfig) -> dict:
    mt = cfg.model_type
    if mt == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise ValueError("llama's attention_bias covers q, k, v and o together")
    if mt in ("mistral", "qwen2") and (cfg.o_bias or cfg.mlp_bias or cfg.qkv_bias != (mt == "qwen2")):
        raise ValueError(f"these biases cannot be expressed as an HF {mt} config")
    rope = {"rope_type": "default", **cfg.rope_parameters, "rope_theta": cfg.rope_theta}
    h = dict(
        model_type=mt, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        hidden_act=ACT_TO_HF[cfg.activation], rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
        eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        attention_dropout=0.0, use_cache=True)
    if mt == "llama":
        h.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    windows = set(cfg.layer_windows) - {0}
    if len(windows) > 1:
        raise ValueError(f"several sliding-window sizes {sorted(windows)} cannot be exported")
    window = windows.pop() if windows else None
    if mt == "mistral":
        if window and 0 in cfg.layer_windows:
            raise ValueError("mistral applies its sliding window to every layer")
        h["sliding_window"] = window
    elif mt == "qwen2":
        h.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=cfg.num_layers,
                 layer_types=["sliding_attention" if w else "full_attention"
                              for w in (cfg.layer_windows or (0,) * cfg.num_layers)])
    elif window:
        raise ValueError("llama has no sliding window")
    return h


def hf_tensors(cfg: ModelConfig) -> list:
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = [plain_tensor("model.embed_tokens.weight", ("embed",), None, (V, D))]
    for i in range(cfg.num_layers):
        pre, lay = f"model.layers.{i}.", lambda *p: ("layers",) + p
        out += [
            plain_tensor(pre + "input_layernorm.weight", lay("attn_norm", "scale"), i, (D,)),
            plain_tensor(pre + "post_attention_layernorm.weight", lay("mlp_norm", "scale"), i, (D,)),
            linear_tensor(pre + "self_attn.q_proj.weight", lay("q", "kernel"), i, (D,), (N, H)),
            linear_tensor(pre + "self_attn.k_proj.weight", lay("k", "kernel"), i, (D,), (K, H)),
            linear_tensor(pre + "self_attn.v_proj.weight", lay("v", "kernel"), i, (D,), (K, H)),
            linear_tensor(pre + "self_attn.o_proj.weight", lay("o", "kernel"), i, (N, H), (D,)),
            linear_tensor(pre + "mlp.gate_proj.weight", lay("gate", "kernel"), i, (D,), (F,)),
            linear_tensor(pre + "mlp.up_proj.weight", lay("up", "kernel"), i, (D,), (F,)),
            linear_tensor(pre + "mlp.down_proj.weight", lay("down", "kernel"), i, (F,), (D,)),
        ]
        if cfg.qkv_bias:
            out += [plain_tensor(pre + f"self_attn.{n}_proj.bias", lay(n, "bias"), i, (c * H,), (c, H))
                    for n, c in (("q", N), ("k", K), ("v", K))]
        if cfg.o_bias:
            out.append(plain_tensor(pre + "self_attn.o_proj.bias", lay("o", "bias"), i, (D,)))
        if cfg.mlp_bias:
            out += [plain_tensor(pre + "mlp.gate_proj.bias", lay("gate", "bias"), i, (F,)),
                    plain_tensor(pre + "mlp.up_proj.bias", lay("up", "bias"), i, (F,)),
                    plain_tensor(pre + "mlp.down_proj.bias", lay("down", "bias"), i, (D,))]
    out.append(plain_tensor("model.norm.weight", ("final_norm", "scale"), None, (D,)))
    if cfg.lm_head and not cfg.tie_word_embeddings and not cfg.num_labels:
        out.append(linear_tensor("lm_head.weight", ("lm_head", "kernel"), None, (D,), (V,)))
    if cfg.num_labels:
        out.append(linear_tensor("score.weight", ("score", "kernel"), None, (D,), (cfg.num_labels,)))
    return out


def architecture(cfg: ModelConfig) -> str:
    return ARCH_PREFIX[cfg.model_type] + ("ForSequenceClassification" if cfg.num_labels else "ForCausalLM")
