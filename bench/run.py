"""One entry point for the training benchmarks: `python -m bench.run --suite cpu|gpu|tpu`.

For each kind (sft, rm, dpo with the reference on the fly, dpo_pre with it precomputed, grpo, ppo) it runs the
real loop (`jaxalign.train.loop.train`) from scratch on a preset shape for --steps steps, every row padded to
--length (one bucket), on the bundled quickstart data (GRPO/PPO with the sorting verifier as reward), and
reads the loop's own per-step metrics: step time (median over the steps after the first), tokens/s (real,
unpadded tokens), MFU (MaxText's FLOPs: matmuls, causal attention halved, padded positions included, over
the peak: the device's published bf16 peak on an accelerator, on CPU the f32 matmul peak measured in this run
by a large jitted matmul) and compile time (first step minus a steady one). GRPO and PPO step times include
their generation (the rollout is part of the loop's step); their MFU counts the train step's FLOPs only. On CPU, `--torch` adds the same
SFT step (forward + backward + AdamW) in transformers + torch eager on the same shape, as a ratio.

Each run appends one line to bench/results.jsonl (date, hardware, commit, settings, results); the README
table is written by hand from it. CI runs `--preset tiny --steps 1` so the code cannot rot; no speed is
asserted anywhere. Shapes from scratch take the tokenizer's vocabulary (the quickstart's: 368 tokens, padded to 384).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxalign.config import apply_overrides, base_config  # noqa: E402
from jaxalign.train import get_task  # noqa: E402
from jaxalign.train.loop import read_metrics, train  # noqa: E402
from jaxalign.train.metrics import peak_flops  # noqa: E402

ASSETS = os.path.join(ROOT, "jaxalign", "assets", "quickstart")
KINDS = ("sft", "rm", "dpo", "dpo_pre", "grpo", "ppo")
SUITES = {"cpu": dict(preset="small", dtype="float32", batch=8, length=128),
          "gpu": dict(preset="llama3_1b", dtype="bfloat16", batch=8, length=4096),
          "tpu": dict(preset="llama3_1b", dtype="bfloat16", batch=8, length=4096)}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large jitted float32 matmul on the default device (the CPU's practical peak)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def kind_config(kind: str, args, run_dir: str):
    task = "dpo" if kind == "dpo_pre" else kind
    data = {"sft": "sft_train.jsonl", "rm": "pref_train.jsonl", "dpo": "pref_train.jsonl",
            "grpo": "grpo_train.jsonl", "ppo": "grpo_train.jsonl"}[task]
    o = [f"task={task}", f"run_dir={run_dir}", f"model.preset={args.preset}", f"model.dtype={args.dtype}",
         "model.param_dtype=float32", f"model.remat={args.remat}", f"tokenizer.path={ASSETS}",
         f"data.train_files={os.path.join(ASSETS, data)}", f"data.max_length={args.length}",
         f"data.buckets=({args.length},)", f"train.steps={args.steps + 1}", f"train.batch_size={args.batch}",
         "train.log_every=1", "train.progress=false", "checkpoint.every=0", "optim.lr=1e-5"]
    if kind == "dpo_pre":
        o.append("dpo.precompute_ref_logps=true")
    if task == "grpo":
        o += [f"train.batch_size={max(args.batch // 4, 1)}", "grpo.num_generations=4", "grpo.beta=0.04",
              f"grpo.max_completion_length={args.length // 2}", "grpo.reward_funcs=jaxalign.rewards:sorted_digits"]
    if task == "ppo":
        o += [f"ppo.max_completion_length={args.length // 2}", "ppo.reward_funcs=jaxalign.rewards:sorted_digits"]
    return apply_overrides(base_config(), o)


def bench_kind(kind: str, args, peak: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg = kind_config(kind, args, os.path.join(d, kind))
        t0 = time.perf_counter()
        train(cfg, get_task(cfg.task), log=lambda *_: None)
        wall = time.perf_counter() - t0
        steps = [m for m in read_metrics(cfg.run_dir) if "step_time" in m]
    first, rest = steps[0], steps[1:] or steps
    step = float(np.median([m["step_time"] for m in rest]))
    flops = float(np.median([m["tflops_per_sec_per_device"] for m in rest])) * 1e12
    return {"step_time_s": step, "tokens_per_sec": float(np.median([m["tokens_per_sec"] for m in rest])),
            "mfu": flops / peak if peak else None, "compile_s": max(first["step_time"] - step, 0.0),
            "wall_s": wall}


def torch_sft_step(args) -> float:
    """Median seconds of one transformers + torch eager SFT step (forward, backward, AdamW) on the same shape."""
    import torch
    import transformers

    from jaxalign.convert.hf import config_to_hf
    from jaxalign.models.presets import get_preset
    from jaxalign.data.templates import load_tokenizer
    vocab = -(-len(load_tokenizer(ASSETS)) // 64) * 64
    h = config_to_hf(get_preset(args.preset).replace(vocab_size=vocab))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in h.items()
                                                                      if k != "architectures"}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, vocab, (args.batch, args.length))
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    p.add_argument("--preset", default=None, help="model shape (jaxalign/models/presets.py)")
    p.add_argument("--dtype", default=None, help="compute dtype")
    p.add_argument("--batch", type=int, default=None, help="rows (prompts for GRPO: batch/4 x 4 samples)")
    p.add_argument("--length", type=int, default=None, help="every row is padded to this length")
    p.add_argument("--remat", default="none")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up/compile step)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--torch", action="store_true", help="CPU: also time the SFT step in transformers + torch")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results.jsonl"))
    args = p.parse_args(argv)
    for k, v in SUITES[args.suite].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = matmul_peak() if on_cpu else peak_flops()
    print(f"{jax.devices()[0].device_kind} x {jax.device_count()}, {args.preset}, batch {args.batch} x "
          f"{args.length}, {args.dtype}; peak {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s"
          f"{' (measured f32 matmul)' if on_cpu else ''}")
    results = {}
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        if kind not in KINDS:
            raise SystemExit(f"--kinds: unknown kind {kind!r} (choose from {', '.join(KINDS)})")
        r = results[kind] = bench_kind(kind, args, peak)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{kind:8s} step {r['step_time_s'] * 1e3:8.1f} ms  {r['tokens_per_sec']:9.0f} tok/s  MFU {mfu:>6s}  "
              f"compile {r['compile_s']:.1f} s")
    if args.torch and "sft" in results:
        t = torch_sft_step(args)
        results["torch_sft_step_time_s"] = t
        print(f"torch eager SFT step {t * 1e3:.1f} ms: jaxalign is {t / results['sft']['step_time_s']:.2f}x faster")
    line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hardware": {"device": jax.devices()[0].device_kind, "count": jax.device_count(),
                         "cpus": os.cpu_count()},
            "commit": commit(), "settings": {k: getattr(args, k) for k in
                                             ("suite", "preset", "dtype", "batch", "length", "remat", "steps")},
            "peak_flops": peak, "results": results}
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


if __name__ == "__main__":
    main()
