"""Build the bundled tiny random LLaMA (jaxalign/assets/tiny-llama), used by the README's first command.

Deterministic (seed 0), bf16 (so the README round trip shows bf16 kept as bf16), ~0.2 MB.
Run: python scripts/make_tiny_model.py
"""
import os

from jaxalign import models
from jaxalign.models.config import ModelConfig

OUT = os.path.join(os.path.dirname(__file__), "..", "jaxalign", "assets", "tiny-llama")

CONFIG = ModelConfig(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0, norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, param_dtype="bfloat16")

if __name__ == "__main__":
    models.from_config(CONFIG, seed=0).save_pretrained(OUT, overwrite=True)
    print("wrote", os.path.abspath(OUT))
