"""Every recipe in configs/ loads onto the skeleton (an unknown or misspelled field would be an error), names a
task that exists, and the quickstart's RL stages start from the SFT stage with the sorting verifier."""
import glob
import os

import pytest

from jaxalign.config import load_config
from jaxalign.train import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "jaxalign", "recipes", "**", "*.py"), recursive=True))


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, ROOT) for p in RECIPES])
def test_recipe_loads(path):
    cfg = load_config(path)
    assert get_task(cfg.task).name == cfg.task


@pytest.mark.parametrize("task", ["grpo", "ppo"])
def test_quickstart_rl_stages_use_the_verifier(task):
    cfg = load_config(os.path.join(ROOT, "jaxalign", "recipes", "quickstart", f"{task}.py"))
    assert cfg[task].reward_funcs == "jaxalign.rewards:sorted_digits" and cfg[task].eval_temperature == 1.0
    assert cfg.model.path.endswith("quickstart/sft") and not getattr(cfg[task], "reward_model", "")
