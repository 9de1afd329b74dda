"""One entry point for the benchmarks: `python -m bench.run --suite cpu|gpu|tpu`.

For each training kind (sft, rm, dpo with the reference on the fly, dpo_pre with it precomputed, grpo, ppo) it
runs the real loop (`jaxalign.train.loop.train`) from scratch on a preset shape for --steps steps, every row
padded to --length (one bucket), on the bundled quickstart data (GRPO/PPO with the sorting verifier as reward),
and reads the loop's own per-step metrics: step time (median over the steps after the first), tokens/s (real,
unpadded tokens), MFU (MaxText's FLOPs: matmuls, causal attention halved, padded positions included, over the
peak: the device's published bf16 peak on an accelerator, on CPU the f32 matmul peak measured in this run by a
large jitted matmul), compile time (first step minus a steady one), XLA's memory analysis of the compiled step
(the dry run's; offline kinds), the device's peak memory (accelerators; `--isolate`, their default, gives each
kind its own process so the peak is that kind's), and for GRPO/PPO the share of the step spent producing the
rollout (generation, scoring, log-probs). GRPO/PPO step times include the rollout; their MFU counts the train
step's FLOPs only. The `sampler` kind times prefill and decode of `jaxalign.sampling.generate` on the preset's
own shape and the decode step against the weight-bandwidth bound. On CPU, `--torch` adds transformers + torch
eager side by side: the same SFT step (forward + backward + AdamW) and `generate`, as ratios.

Each run appends one line to bench/results.jsonl (date, hardware, commit, settings, results); the README
table is written by hand from it. CI runs `--preset tiny --steps 1` so the code cannot rot; no speed is
asserted anywhere. Training shapes from scratch take the tokenizer's vocabulary (the quickstart's: 368 tokens,
padded to 384). XLA flags are jaxalign's own (jaxalign/parallel/xla_flags.py), as `jaxalign train` sets them.
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

from bench import profile  # noqa: E402
from bench import sampler as sampler_bench  # noqa: E402
from jaxalign import loading  # noqa: E402
from jaxalign.config import apply_overrides, base_config  # noqa: E402
from jaxalign.models.presets import get_preset  # noqa: E402
from jaxalign.parallel import xla_flags  # noqa: E402
from jaxalign.parallel.mesh import make_mesh  # noqa: E402
from jaxalign.train.registry import get_task  # noqa: E402
from jaxalign.train.dryrun import dry_run  # noqa: E402
from jaxalign.train.loop import read_metrics, train  # noqa: E402
from jaxalign.train.metrics import peak_flops  # noqa: E402

ASSETS = os.path.join(ROOT, "jaxalign", "assets", "quickstart")
KINDS = ("sft", "rm", "dpo", "dpo_pre", "grpo", "ppo", "sampler")
SETTINGS = ("suite", "preset", "dtype", "batch", "length", "remat", "attention", "steps", "sampler_batch",
            "sampler_prompt", "sampler_new", "profile")
# sampler_*: the `sampler` kind's batch, longest prompt and new tokens (prompts are prompt/2..prompt long)
SUITES = {"cpu": dict(preset="small", dtype="float32", batch=8, length=128, remat="dots",
                      sampler_batch=8, sampler_prompt=64, sampler_new=64),
          "gpu": dict(preset="llama3_1b", dtype="bfloat16", batch=8, length=4096, remat="dots", attention="cudnn",
                      sampler_batch=64, sampler_prompt=1024, sampler_new=512),
          "tpu": dict(preset="llama3_1b", dtype="bfloat16", batch=8, length=4096, remat="dots", attention="splash",
                      sampler_batch=64, sampler_prompt=1024, sampler_new=512)}


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
    if args.attention:
        o.append(f"model.attention_impl={args.attention}")
    if kind == "dpo_pre":
        o.append("dpo.precompute_ref_logps=true")
    if task == "grpo":
        o += [f"train.batch_size={max(args.batch // 4, 1)}", "grpo.num_generations=4", "grpo.beta=0.04",
              f"grpo.max_completion_length={args.length // 2}", "grpo.reward_funcs=jaxalign.rewards:sorted_digits"]
    if task == "ppo":
        o += [f"ppo.max_completion_length={args.length // 2}", "ppo.reward_funcs=jaxalign.rewards:sorted_digits"]
    return apply_overrides(base_config(), o)


def peak_memory():
    """Peak bytes in use on device 0 since the process started (None on CPU, which keeps no such count)."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def step_memory(cfg) -> int:
    """Bytes per device the compiled train step needs by XLA's memory analysis (the dry run's: arguments +
    outputs - donated + temporaries); None for the kinds it does not compile (rollouts, precomputed reference
    log-probs)."""
    return dry_run(cfg, get_task(cfg.task), log=lambda *_: None).get("needed")


def bench_kind(kind: str, args, peak: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg = kind_config(kind, args, os.path.join(d, kind))
        t0 = time.perf_counter()
        if args.profile:
            jax.profiler.start_trace(os.path.join(args.profile, kind))
        train(cfg, get_task(cfg.task), log=lambda *_: None)
        if args.profile:
            jax.profiler.stop_trace()
            print(f"{kind} profile ({os.path.join(args.profile, kind)}):\n"
                  + profile.report(profile.op_times(os.path.join(args.profile, kind)), steps=args.steps + 1))
        wall = time.perf_counter() - t0
        steps = [m for m in read_metrics(cfg.run_dir) if "step_time" in m]
        memory = step_memory(cfg)
    first, rest = steps[0], steps[1:] or steps
    step = float(np.median([m["step_time"] for m in rest]))
    flops = float(np.median([m["tflops_per_sec_per_device"] for m in rest])) * 1e12
    out = {"step_time_s": step, "tokens_per_sec": float(np.median([m["tokens_per_sec"] for m in rest])),
           "mfu": flops / peak if peak else None, "compile_s": max(first["step_time"] - step, 0.0),
           "wall_s": wall, "step_memory_bytes": memory, "peak_memory_bytes": peak_memory()}
    if "rollout_share" in first:  # GRPO/PPO: the share of the step spent producing the rollout
        out["rollout_share"] = float(np.median([m["rollout_share"] for m in rest]))
    return out


def bench_sampler(args) -> dict:
    """Prefill/decode throughput of the sampler on the preset's own shape (its vocabulary, random weights) and
    the decode step against the weight-bandwidth bound; on CPU with --torch, transformers `generate` too."""
    cfg = get_preset(args.preset).replace(dtype=args.dtype, param_dtype=args.dtype)
    lm = loading.from_config(cfg, mesh=make_mesh((1, -1, 1)))
    ps = sampler_bench.prompts(args.sampler_batch, args.sampler_prompt, cfg.vocab_size)
    r = sampler_bench.measure(lm, ps, args.sampler_new, repeats=max(args.steps, 1),
                              bandwidth=sampler_bench.device_bandwidth())
    print(f"sampler  {sampler_bench.report(r)}")
    if args.torch and jax.devices()[0].platform == "cpu":
        hf = sampler_bench.bench_hf(lm, ps, args.sampler_new, max(args.steps, 1), threads=os.cpu_count())
        r.update(hf_generate_s=hf, vs_generate=hf / r["total_s"])
        print(f"transformers generate {hf * 1e3:.1f} ms: the sampler is {r['vs_generate']:.2f}x faster")
    r["peak_memory_bytes"] = peak_memory()
    return r


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


def in_child(kind: str, args) -> dict:
    """One kind's results (and its torch side-by-side) from a fresh process: its own device memory peak."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.jsonl")
        argv = [sys.executable, "-m", "bench.run", "--suite", args.suite, "--kinds", kind, "--out", out,
                "--no-isolate"] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SETTINGS
                                   if k != "suite" and getattr(args, k) is not None]
        subprocess.run(argv + (["--torch"] if args.torch else []), cwd=ROOT, check=True)
        with open(out) as f:
            return json.loads(f.readline())["results"]


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
    p.add_argument("--remat", default=None, help="none | dots | full (suite default: dots, the fastest on CPU)")
    p.add_argument("--attention", default=None, help="model.attention_impl (suite default: XLA's on CPU, cudnn on "
                                                     "GPU, splash on TPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up/compile step)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--sampler-batch", type=int, default=None)
    p.add_argument("--sampler-prompt", type=int, default=None, help="longest prompt (the shortest is half)")
    p.add_argument("--sampler-new", type=int, default=None, help="new tokens per row")
    p.add_argument("--torch", action="store_true",
                   help="CPU: also time the SFT step in transformers + torch, and `generate` for the sampler")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results.jsonl"))
    p.add_argument("--profile", default="", help="trace each training kind with jax.profiler into this directory "
                                                 "and print its top XLA ops (bench/profile.py)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each kind in its own process, so the device's peak memory is that kind's "
                        "(default: on for accelerators)")
    args = p.parse_args(argv)
    for k, v in SUITES[args.suite].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not xla_flags.backend_started():  # the flags `jaxalign train` runs with (+ XLA:CPU's op events)
        xla_flags.apply(extra=profile.CPU_FLAG if args.profile else "")
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = matmul_peak() if on_cpu else peak_flops()
    print(f"{jax.devices()[0].device_kind} x {jax.device_count()}, {args.preset}, batch {args.batch} x "
          f"{args.length}, {args.dtype}; peak {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s"
          f"{' (measured f32 matmul)' if on_cpu else ''}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"--kinds: unknown kind {unknown[0]!r} (choose from {', '.join(KINDS)})")
    results = {}
    isolate = (not on_cpu) if args.isolate is None else args.isolate
    for kind in kinds:
        if isolate and len(kinds) > 1:
            results.update(in_child(kind, args))
            continue
        if kind == "sampler":
            results[kind] = bench_sampler(args)
            continue
        r = results[kind] = bench_kind(kind, args, peak)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = "  ".join(f"{name} {r[k] / 2**30:.2f} GiB" for name, k in
                        (("step memory", "step_memory_bytes"), ("peak", "peak_memory_bytes")) if r[k])
        if "rollout_share" in r:
            mem += f"  rollout {r['rollout_share']:.0%} of the step"
        print(f"{kind:8s} step {r['step_time_s'] * 1e3:8.1f} ms  {r['tokens_per_sec']:9.0f} tok/s  MFU {mfu:>6s}  "
              f"compile {r['compile_s']:.1f} s  {mem}")
    if args.torch and "sft" in results and "torch_sft_step_time_s" not in results:
        t = torch_sft_step(args)
        results["torch_sft_step_time_s"] = t
        print(f"torch eager SFT step {t * 1e3:.1f} ms: jaxalign is {t / results['sft']['step_time_s']:.2f}x faster")
    line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hardware": {"device": jax.devices()[0].device_kind, "count": jax.device_count(),
                         "cpus": os.cpu_count()},
            "commit": commit(), "settings": {k: getattr(args, k) for k in SETTINGS},
            "peak_flops": peak, "results": results}
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


if __name__ == "__main__":
    main()
