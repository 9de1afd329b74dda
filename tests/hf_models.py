"""Tiny random HF models, one per supported family, built locally (no network).

Weights are re-drawn at a larger scale than HF's init so logits are O(1) and parity tests are meaningful.
"""
import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)

FAMILIES = {
    # Llama 2: multi-head attention, plain RoPE, untied head.
    "llama2": ("Llama", dict(COMMON, num_key_value_heads=4)),
    # Llama 3.x: grouped-query attention, llama3 rope scaling, tied embeddings (as 3.2 1B/3B).
    "llama3": ("Llama", dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 32})),
    # Llama with attention and MLP biases (attention_bias / mlp_bias options).
    "llama_bias": ("Llama", dict(COMMON, num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    # Mistral: GQA and a sliding window short enough to matter in the tests.
    "mistral": ("Mistral", dict(COMMON, num_key_value_heads=2, sliding_window=4)),
    # Qwen2: q/k/v biases; sliding window on layer 1 only (max_window_layers=1).
    "qwen2": ("Qwen2", dict(COMMON, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                            max_window_layers=1)),
    "gpt2": ("GPT2", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)),
}


def build(family: str, seq_cls: bool = False, seed: int = 0, **overrides):
    prefix, kwargs = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(**{**kwargs, **overrides}, num_labels=1 if seq_cls else 2)
    if seq_cls:
        cls = getattr(transformers, f"{prefix}ForSequenceClassification")
    else:
        cls = getattr(transformers, "GPT2LMHeadModel" if prefix == "GPT2" else f"{prefix}ForCausalLM")
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_tiny(family: str, path: str, dtype="float32", seq_cls=False, **overrides):
    model = build(family, seq_cls, **overrides)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return path
