"""The decoder-only models: Flax NNX modules (transformer.py, layers.py), their config (config.py), the HF
families' config/tensor layouts (llama.py, gpt2.py) and presets. No file I/O here: loading and saving
models is jaxalign.loading (`from_pretrained`, `from_config`, `LM`), HF/PEFT files are jaxalign.convert.
"""
import jax
from flax import nnx

from jaxalign.models.config import ModelConfig
from jaxalign.models.layers import KVCache
from jaxalign.models.transformer import CausalLM

__all__ = ["CausalLM", "ModelConfig", "KVCache", "abstract_params"]


def abstract_params(cfg: ModelConfig):
    """(graphdef, abstract nnx.State) without allocating anything; callable anywhere, also inside a traced
    step under a mesh (an empty abstract mesh keeps NNX from resolving the logical axis names)."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0))))
