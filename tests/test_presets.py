"""Preset shapes against the parameter counts of the published checkpoints, and against the actual
(abstract) parameter tree, so ModelConfig.num_params, the presets and the module agree."""
import math

import jax
import pytest

from jaxalign.models import abstract_params
from jaxalign.models.presets import PRESETS, get_preset

PUBLISHED = {  # sum of tensor sizes in the HF safetensors of each model
    "llama3_1b": 1_235_814_400, "llama3_3b": 3_212_749_824, "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496, "llama2_7b": 6_738_415_616, "mistral_7b": 7_241_732_096,
    "qwen2.5_0.5b": 494_032_768, "gpt2": 124_439_808,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_count(name):
    assert PRESETS[name].num_params() == PUBLISHED[name]


@pytest.mark.parametrize("name", ["tiny", "llama3_1b", "qwen2.5_0.5b", "gpt2"])
def test_num_params_matches_module(name):
    _, state = abstract_params(PRESETS[name])
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(state)) == PRESETS[name].num_params()


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown model preset"):
        get_preset("llama9_1t")
