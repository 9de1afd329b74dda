"""`jaxalign plot RUN_DIR`: PNG curves of a run's metrics.jsonl (one panel per metric, eval dashed)."""
import math
import os

from jaxalign import JaxalignError
from jaxalign.train.loop import read_metrics

SKIP = {"step", "time", "lr", "nonfinite"}  # "time": wall-clock seconds of each line, not a curve


def plot_run(run_dir: str, out: str = None) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise JaxalignError("jaxalign plot needs matplotlib: pip install 'jaxalign[plot]'") from None

    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        raise JaxalignError(f"{run_dir}: no metrics.jsonl")
    rows = read_metrics(run_dir)
    series = {}
    for r in rows:
        for k, v in r.items():
            if k not in SKIP:
                series.setdefault(k.removeprefix("eval/"), {}).setdefault(k.startswith("eval/"), []).append(
                    (r["step"], v))
    if not series:
        raise JaxalignError(f"{run_dir}/metrics.jsonl: no metrics to plot")
    names = sorted(series, key=lambda n: (n != "loss", n))
    cols = min(3, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(5 * cols, 3.2 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        for is_eval, pts in sorted(series[name].items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "--o" if is_eval else "-", markersize=3, label="eval" if is_eval else "train")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series[name]) > 1:
            ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
