"""Every recipe in configs/ loads onto the skeleton (an unknown or misspelled field would be an error), names a
task that exists, and the quickstart's RL stages start from the SFT stage with the sorting verifier."""
import glob
import os

import pytest

from jaxalign.config import load_config
from jaxalign.train.registry import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "jaxalign", "recipes", "**", "*.py"), recursive=True))


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, ROOT) for p in RECIPES])
def test_recipe_loads(path):
    # a recipe may leave a field for the command line (its docstring says which); load_config insists on it
    needs = {"ppo.py": ["ppo.reward_model=RM_DIR"]}
    cfg = load_config(path, needs.get(os.path.relpath(path, os.path.join(ROOT, "configs")), []))
    assert get_task(cfg.task).name == cfg.task


@pytest.mark.parametrize("task", ["grpo", "ppo"])
def test_quickstart_rl_stages_use_the_verifier(task):
    cfg = load_config(os.path.join(ROOT, "jaxalign", "recipes", "quickstart", f"{task}.py"))
    assert cfg[task].reward_funcs == "jaxalign.rewards:sorted_digits" and cfg[task].eval_temperature == 1.0
    assert cfg.model.path.endswith("quickstart/sft") and not getattr(cfg[task], "reward_model", "")


BAD_FIELDS = [("grpo", "grpo.estimator='bogus'", "grpo.estimator"),
              ("grpo", "grpo.num_iterations=3", "grpo.num_iterations"),
              ("ppo", "ppo.kl_estimator='k9'", "ppo.kl_estimator"),
              ("ppo", "ppo.ptx_files='x.jsonl'", "ppo.ptx_coef"),
              ("ppo", "ppo.reward_funcs=''", "ppo.reward_model"),
              ("dpo", "dpo.loss_type='sigmoid,bogus'", "dpo.loss_type"),
              ("kto", "kto.precompute_ref_logps=True", "kto.precompute_ref_logps"),
              ("sft", "train.micro_batch_size=3", "train.micro_batch_size")]


@pytest.mark.parametrize("task,line,field", BAD_FIELDS, ids=[f for _, _, f in BAD_FIELDS])
def test_bad_task_field_fails_at_load_before_data_or_weights(tmp_path, monkeypatch, task, line, field):
    """load_config runs the task's own check: a bad field is a one-line error naming the recipe and the field,
    raised before any data is tokenised or weights are loaded (both are booby-trapped here)."""
    import time

    from jaxalign import JaxalignError, loading
    from jaxalign.data import pipeline

    def trap(*a, **k):
        raise AssertionError("read data or weights before checking the config")
    monkeypatch.setattr(loading, "from_pretrained", trap)
    monkeypatch.setattr(pipeline, "prepare", trap)
    recipe = tmp_path / "recipe.py"
    ppo = "    c.ppo = dict(reward_funcs='m:f')\n" if task == "ppo" else ""
    recipe.write_text("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                      f"    c.task = {task!r}\n    c.model = dict(path='/nonexistent/model')\n{ppo}"
                      "    c.data = dict(train_files='/nonexistent/data.jsonl')\n"
                      "    c.train = dict(steps=4, batch_size=4)\n    return c\n")
    start = time.perf_counter()
    with pytest.raises(JaxalignError, match=field.replace(".", r"\.")) as e:
        load_config(str(recipe), [line.replace("'", "")])
    assert time.perf_counter() - start < 10  # no weights, no tokenising: a config check only
    assert str(e.value).startswith(str(recipe)) and "\n" not in str(e.value)


def test_dry_run_fails_on_a_bad_task_field_like_train(tmp_path):
    """`jaxalign train --dry-run` runs the same checks (it skipped GRPO's and PPO's before): exit 2, one line."""
    import subprocess
    import sys
    recipe = tmp_path / "recipe.py"
    recipe.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict("
                      "dict(task='grpo', model=dict(path='/nonexistent'), data=dict(train_files='/nonexistent')))\n")
    out = subprocess.run([sys.executable, "-m", "jaxalign.cli", "train", "--config", str(recipe), "--dry-run",
                          "--config.grpo.aggregation=bogus"], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "grpo.aggregation='bogus'" in out.stderr, out.stderr


def test_the_skeleton_comes_from_the_registry():
    """Every registered task with defaults owns exactly its section; the skeleton has no section of a task
    that does not exist."""
    from jaxalign.config import base_config
    from jaxalign.train.task import TASKS
    cfg = base_config()
    assert {t.name for t in TASKS.values() if t.defaults is not None} == {"rm", "dpo", "simpo", "cpo", "orpo", "kto",
                                                                           "grpo", "ppo"}
    for t in TASKS.values():
        if t.defaults is not None:
            assert cfg[t.name].to_dict() == t.defaults
    assert "sft" not in cfg
