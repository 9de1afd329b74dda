"""GPT-2: HF config and weight layout (learned positions, LayerNorm, Conv1D [in, out] weights, fused
c_attn split into our q/k/v, tied head). The math is transformer.CausalLM with GPT-2's options."""
import numpy as np

from jaxalign.models.config import HFTensor, ModelConfig, linear_tensor, plain_tensor
from jaxalign.models.llama import ACT_FROM_HF, ACT_TO_HF, num_labels

MODEL_TYPES = ("gpt2",)


def config_from_hf(h: dict, **runtime) -> ModelConfig:
    D, N = h["n_embd"], h["n_head"]
    act = h.get("activation_function", "gelu_new")
    if act not in ACT_FROM_HF:
        raise ValueError(f"activation_function {act!r} is not supported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if h.get(flag):
            raise ValueError(f"GPT-2 option {flag}=true is not supported")
    if h.get("scale_attn_weights") is False:
        raise ValueError("GPT-2 option scale_attn_weights=false is not supported")
    seq_cls = any(a.endswith("ForSequenceClassification") for a in h.get("architectures") or ())
    return ModelConfig(
        model_type="gpt2", vocab_size=h["vocab_size"], hidden_size=D, intermediate_size=h.get("n_inner") or 4 * D,
        num_layers=h["n_layer"], num_heads=N, num_kv_heads=N, head_dim=D // N,
        max_position_embeddings=h.get("n_positions", 1024), norm="layer",
        norm_eps=h.get("layer_norm_epsilon", 1e-5), activation=ACT_FROM_HF[act], gated_mlp=False,
        qkv_bias=True, o_bias=True, mlp_bias=True, position="learned",
        tie_word_embeddings=h.get("tie_word_embeddings", True), lm_head=not seq_cls,
        num_labels=num_labels(h) if seq_cls else 0, bos_token_id=h.get("bos_token_id"),
        eos_token_id=h.get("eos_token_id"), pad_token_id=h.get("pad_token_id"),
        initializer_range=h.get("initializer_range", 0.02), **runtime)


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.num_heads != cfg.num_kv_heads or cfg.norm != "layer" or cfg.gated_mlp or cfg.position != "learned":
        raise ValueError("this model cannot be expressed as an HF gpt2 config")
    return dict(
        model_type="gpt2", vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
        layer_norm_epsilon=cfg.norm_eps, activation_function=ACT_TO_HF[cfg.activation].replace(
            "gelu_pytorch_tanh", "gelu_new"), tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        initializer_range=cfg.initializer_range, scale_attn_weights=True, use_cache=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)


def _fused_qkv(name, layer, D, N, H, is_bias):
    """c_attn packs q, k, v along its output dim: [D, 3D] weight (Conv1D layout) or [3D] bias."""
    lead = () if is_bias else (D,)
    part = "bias" if is_bias else "kernel"
    paths = tuple(("layers", n, part) for n in ("q", "k", "v"))
    split = lambda w: tuple(x.reshape(*lead, N, H) for x in np.split(w, 3, axis=-1))
    join = lambda *ks: np.concatenate([k.reshape(*lead, N * H) for k in ks], axis=-1)
    return HFTensor(name, paths, layer, lead + (3 * N * H,), split, join)


def hf_tensors(cfg: ModelConfig) -> list:
    D, F, V, P = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings
    N, H = cfg.num_heads, cfg.head_dim
    out = [plain_tensor("transformer.wte.weight", ("embed",), None, (V, D)),
           plain_tensor("transformer.wpe.weight", ("wpe",), None, (P, D))]
    for i in range(cfg.num_layers):
        pre, lay = f"transformer.h.{i}.", lambda *p: ("layers",) + p
        out += [
            plain_tensor(pre + "ln_1.weight", lay("attn_norm", "scale"), i, (D,)),
            plain_tensor(pre + "ln_1.bias", lay("attn_norm", "bias"), i, (D,)),
            _fused_qkv(pre + "attn.c_attn.weight", i, D, N, H, is_bias=False),
            _fused_qkv(pre + "attn.c_attn.bias", i, D, N, H, is_bias=True),
            linear_tensor(pre + "attn.c_proj.weight", lay("o", "kernel"), i, (N, H), (D,), transposed=False),
            plain_tensor(pre + "attn.c_proj.bias", lay("o", "bias"), i, (D,)),
            plain_tensor(pre + "ln_2.weight", lay("mlp_norm", "scale"), i, (D,)),
            plain_tensor(pre + "ln_2.bias", lay("mlp_norm", "bias"), i, (D,)),
            linear_tensor(pre + "mlp.c_fc.weight", lay("up", "kernel"), i, (D,), (F,), transposed=False),
            plain_tensor(pre + "mlp.c_fc.bias", lay("up", "bias"), i, (F,)),
            linear_tensor(pre + "mlp.c_proj.weight", lay("down", "kernel"), i, (F,), (D,), transposed=False),
            plain_tensor(pre + "mlp.c_proj.bias", lay("down", "bias"), i, (D,)),
        ]
    out += [plain_tensor("transformer.ln_f.weight", ("final_norm", "scale"), None, (D,)),
            plain_tensor("transformer.ln_f.bias", ("final_norm", "bias"), None, (D,))]
    if cfg.lm_head and not cfg.tie_word_embeddings and not cfg.num_labels:
        out.append(linear_tensor("lm_head.weight", ("lm_head", "kernel"), None, (D,), (V,)))
    if cfg.num_labels:
        out.append(linear_tensor("score.weight", ("score", "kernel"), None, (D,), (cfg.num_labels,)))
    return out


def architecture(cfg: ModelConfig) -> str:
    return "GPT2ForSequenceClassification" if cfg.num_labels else "GPT2LMHeadModel"
