"""The largest Llama shape whose train step fits one device, found by compile-only memory analysis.

    python -m bench.fit                                  # one H200 (140.4 GiB), sequence 4096, SFT
    python -m bench.fit --memory-gib 79.1 --task dpo     # an H100 80GB, DPO (a frozen reference on the fly)
    python -m bench.fit --target h200                    # compiled for an H200 by the GPU compiler, no GPU needed

For each mode (full: bf16 compute over fp32 master weights and AdamW; lora: rank-16 adapters on every projection
over a bf16 base; lora_int8: over an int8 base), it compiles the train step of the Llama shapes in --presets,
smallest first, with the code of `jaxalign train --dry-run` (abstract parameters and optimizer state: nothing
is allocated), one row of --seq tokens per step, remat "full", one device. The first shape that does not fit
then has its layer count bisected, so the answer reads "llama3_70b's width with N layers". A step fits when
XLA's arguments + outputs - donated + temporaries are within --memory-gib x --memory-fraction (the share XLA's
allocator takes; runtime.memory_fraction).

Attention is the platform's fused kernel, which keeps no [T, S] scores: cudnn on GPU, splash on TPU, and on
CPU splash in Pallas interpret mode as its stand-in. `--target h200` compiles for an H200 without one (XLA's
deviceless GPU compilation; needs `pip install "jax[cuda12]"`): the GPU compiler's own numbers. Compiled by
XLA:CPU instead, the numbers are only an approximation (it converts bf16 matmuls to f32 and fuses differently).
Each mode's answer and every probe are appended to bench/results.jsonl.
"""
import argparse
import datetime
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from bench.run import ASSETS, commit  # noqa: E402
from jaxalign.config import apply_overrides, base_config  # noqa: E402
from jaxalign.convert.hf import config_to_hf  # noqa: E402
from jaxalign.models.presets import get_preset  # noqa: E402
from jaxalign.parallel import targets, xla_flags  # noqa: E402
from jaxalign.train.registry import get_task  # noqa: E402
from jaxalign.train.dryrun import dry_run  # noqa: E402

LADDER = ("llama3_1b", "llama3_3b", "llama3_8b", "llama3_70b")
MODES = {"full": [],
         "lora": ["lora.rank=16", "lora.alpha=32.0", "lora.base_dtype=bfloat16"],
         "lora_int8": ["lora.rank=16", "lora.alpha=32.0", "lora.base_dtype=int8"]}
ATTENTION = {"gpu": "cudnn", "tpu": "splash", "cpu": "splash"}


def probe(preset: str, layers: int, mode: str, args) -> dict:
    """Dry-run compile one shape; {preset, layers, params, needed, estimate, fits}."""
    model = get_preset(preset).replace(num_layers=layers)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:  # a model directory with no weights: the shape
            json.dump(config_to_hf(model), f)
        data = {"sft": "sft_train.jsonl", "dpo": "pref_train.jsonl"}[args.task]
        cfg = apply_overrides(base_config(), [
            f"task={args.task}", f"model.path={d}", f"tokenizer.path={ASSETS}",
            f"data.train_files={os.path.join(ASSETS, data)}", f"data.max_length={args.seq}",
            f"data.buckets=({args.seq},)", "data.max_prompt_length=64", "mesh.shape=(1,1,1)", "train.batch_size=1",
            "model.dtype=bfloat16", "model.param_dtype=float32", "model.remat=full",
            f"model.attention_impl={ATTENTION['gpu' if args.target else jax.devices()[0].platform]}",
            f"runtime.dry_run_target={args.target}",
            f"runtime.device_memory_gib={0 if args.target else args.memory_gib}", f"runtime.memory_fraction={args.memory_fraction}",
            f"data.cache_dir={os.path.join(args.cache, 'data')}"] + MODES[mode])
        out = dry_run(cfg, get_task(args.task), log=lambda *_: None,
                      devices=None if args.target else jax.devices()[:1])
    if "needed" not in out:
        raise SystemExit(f"{preset}: the dry run did not compile the step (see `jaxalign train --dry-run`)")
    return {"preset": preset, "layers": layers, "params": out["estimate"]["num_params"], "needed": out["needed"],
            "estimate": out["estimate"]["total"], "fits": out["needed"] <= out["device_memory"]}


def largest(mode: str, args, show=print) -> dict:
    """The largest fitting shape of the ladder, refined by bisecting the layers of the first that does not fit."""
    probes, best = [], None

    def run(preset, layers):
        p = probe(preset, layers, mode, args)
        probes.append(p)
        show(f"  {mode:9s} {preset:11s} {layers:3d} layers {p['params'] / 1e9:6.2f}B  needs "
             f"{p['needed'] / 2**30:7.2f} GiB (estimate {p['estimate'] / 2**30:7.2f})  "
             f"{'fits' if p['fits'] else 'does not fit'}")
        return p

    for preset in args.presets:
        full = get_preset(preset).num_layers
        p = run(preset, full)
        if p["fits"]:
            best = p
            continue
        lo, hi = 0, full  # lo layers fit (0 = unknown), hi do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            q = run(preset, mid)
            lo, hi = (mid, hi) if q["fits"] else (lo, mid)
            if q["fits"] and (best is None or q["params"] > best["params"]):
                best = q
        break
    return {"mode": mode, "largest": best, "probes": probes}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-gib", type=float, default=targets.MEMORY["h200"] / 2**30,
                   help="device memory in GiB (nvidia-smi's; default an H200's 140.4); --target brings its own")
    p.add_argument("--memory-fraction", type=float, default=0.9)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--task", choices=("sft", "dpo"), default="sft")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--presets", default=",".join(LADDER), help="the ladder of shapes, smallest first")
    p.add_argument("--target", default="", help="compile for this GPU deviceless (h200, h100; needs jax[cuda12])")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results.jsonl"))
    args = p.parse_args(argv)
    if args.target:
        if xla_flags.backend_started():
            raise SystemExit("--target must be set before JAX starts (run bench.fit as a program)")
        targets.prepare_env()
        xla_flags.apply(platform="gpu", memory_fraction=args.memory_fraction)
    args.presets = [x.strip() for x in args.presets.split(",") if x.strip()]
    if args.target:
        devices, memory = targets.devices(args.target)
        dev = devices[0]
    else:
        dev, memory = jax.devices()[0], args.memory_gib * 2**30
    print(f"{dev.device_kind}{' (compiled deviceless)' if args.target else ''}: which Llama shapes train "
          f"({args.task}, 1 x {args.seq} tokens a step) in {memory / 2**30:.1f} GiB x {args.memory_fraction:g}")
    results = []
    with tempfile.TemporaryDirectory() as cache:
        args.cache = cache
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            if mode not in MODES:
                raise SystemExit(f"--modes: unknown mode {mode!r} (choose from {', '.join(MODES)})")
            r = largest(mode, args)
            b = r["largest"]
            print(f"{mode}: " + (f"largest {b['preset']} with {b['layers']} layers, {b['params'] / 1e9:.2f}B params "
                                 f"({b['needed'] / 2**30:.1f} GiB)" if b else "nothing fits"))
            results.append(r)
    line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "kind": "fit",
            "hardware": {"device": dev.device_kind, "count": jax.device_count(), "cpus": os.cpu_count()},
            "commit": commit(), "settings": {k: getattr(args, k) for k in
                                             ("memory_gib", "memory_fraction", "seq", "task", "presets", "target")},
            "results": results}
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


if __name__ == "__main__":
    main()
