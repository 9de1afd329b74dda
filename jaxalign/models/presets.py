"""Named architectures for from-scratch runs, benchmarks and `--dry-run` arithmetic (random weights).

Sizes follow the published HF configs; `tests/test_presets.py` checks their parameter counts.
"""
from jaxalign.models.config import ModelConfig, freeze_dict

_LLAMA31_ROPE = freeze_dict({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
_LLAMA32_ROPE = freeze_dict({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
_LLAMA3 = dict(model_type="llama", vocab_size=128256, num_kv_heads=8, head_dim=128, norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001)

PRESETS = {
    "tiny": ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, norm_eps=1e-5,
                        tie_word_embeddings=True),
    # ~27M parameters (8192 vocab): the CPU benchmark shape (bench/)
    "small": ModelConfig(model_type="llama", vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=6,
                         num_heads=8, num_kv_heads=4, head_dim=64, max_position_embeddings=1024, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0),
    "llama3_1b": ModelConfig(**dict(_LLAMA3, head_dim=64), hidden_size=2048, intermediate_size=8192, num_layers=16,
                             num_heads=32, tie_word_embeddings=True, rope_scaling=_LLAMA32_ROPE),
    "llama3_3b": ModelConfig(**_LLAMA3, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
                             tie_word_embeddings=True, rope_scaling=_LLAMA32_ROPE),
    "llama3_8b": ModelConfig(**_LLAMA3, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                             rope_scaling=_LLAMA31_ROPE),
    "llama3_70b": ModelConfig(**_LLAMA3, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                              rope_scaling=_LLAMA31_ROPE),
    "llama2_7b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, norm_eps=1e-5,
                             max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
    "mistral_7b": ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, norm_eps=1e-5,
                              max_position_embeddings=32768, layer_windows=(4096,) * 32, bos_token_id=1,
                              eos_token_id=2),
    "qwen2.5_0.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, norm_eps=1e-6,
                                qkv_bias=True, rope_theta=1000000.0, max_position_embeddings=32768,
                                tie_word_embeddings=True, eos_token_id=151643),
    "gpt2": ModelConfig(model_type="gpt2", vocab_size=50257, hidden_size=768, intermediate_size=3072, num_layers=12,
                        num_heads=12, num_kv_heads=12, head_dim=64, max_position_embeddings=1024, norm="layer",
                        norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False, qkv_bias=True, o_bias=True,
                        mlp_bias=True, position="learned", tie_word_embeddings=True, bos_token_id=50256,
                        eos_token_id=50256),
}


def get_preset(name: str, **runtime) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}: choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**runtime)
