"""`jaxalign plot`, and resuming a run on a different mesh shape."""
import json
import os

import numpy as np
import pytest

from jaxalign import JaxalignError
from jaxalign.config import apply_overrides, base_config
from jaxalign.plot import plot_run
from jaxalign.train.registry import get_task
from jaxalign.train.loop import read_metrics, train
from tests.tokenizers_util import make_tokenizer


def test_plot_writes_png(tmp_path):
    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 6)] + [{"step": 5, "eval/loss": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_run(str(tmp_path))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 5000


def test_plot_without_metrics(tmp_path):
    with pytest.raises(JaxalignError, match="no metrics.jsonl"):
        plot_run(str(tmp_path))


@pytest.fixture(scope="module")
def sort_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("reshard")
    rng = np.random.RandomState(0)
    with open(d / "train.jsonl", "w") as f:
        for _ in range(64):
            xs = rng.randint(0, 10, rng.randint(3, 6))
            f.write(json.dumps({"messages": [{"role": "user", "content": "sort: " + " ".join(map(str, xs))},
                                             {"role": "assistant", "content": " ".join(map(str, sorted(xs)))}]})
                    + "\n")
    return str(d), make_tokenizer(str(d / "tok"))


def _cfg(data_dir, tok, run_dir, steps, mesh):
    cfg = base_config()
    apply_overrides(cfg, [f"run_dir={run_dir}", "model.preset=tiny", f"tokenizer.path={tok}",
                          f"data.train_files={data_dir}/train.jsonl", "data.max_length=48",
                          f"data.cache_dir={data_dir}/cache", "train.progress=false", "train.log_every=1",
                          f"train.steps={steps}", "train.batch_size=8", "checkpoint.every=3",
                          "optim.lr=3e-3", "optim.schedule=constant", f"mesh.shape={mesh}"])
    return cfg


def test_resume_on_another_mesh(sort_data, tmp_path):
    """3 steps on (8,1,1), then resumed on (1,4,2) to step 6 == 6 uninterrupted steps on (8,1,1)."""
    data_dir, tok = sort_data
    quiet = lambda *a: None
    train(_cfg(data_dir, tok, tmp_path / "a", 6, (8, 1, 1)), get_task("sft"), log=quiet)
    train(_cfg(data_dir, tok, tmp_path / "b", 3, (8, 1, 1)), get_task("sft"), log=quiet)
    lines = []
    train(_cfg(data_dir, tok, tmp_path / "b", 6, (1, 4, 2)), get_task("sft"), log=lines.append)
    assert lines[0] == "resuming from step 3"
    a = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "a")}
    b = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "b")}
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], atol=1e-5, rtol=0)


def test_plot_skips_the_time_column(tmp_path, monkeypatch):
    """metrics.jsonl lines carry `time` (wall-clock seconds): a field of the line, not a curve."""
    import matplotlib.axes
    rows = [{"step": s, "time": 1.7e9 + s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    titles = []
    set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **k: (titles.append(t),
                                                                                    set_title(ax, t, *a, **k))[1])
    plot_run(str(tmp_path))
    assert titles == ["loss"]
