"""LoRA against full fine-tuning: SFT train-step time and the bytes each keeps per device.

    python bench/lora.py                                  # CPU: a small random LLaMA
    python bench/lora.py --preset llama3_1b --dtype bfloat16 --batch 8 --length 2048    # on an accelerator

Both sides run the loop's own train step (jaxalign.train.step.make_train_step) on the same random batch,
after a warm-up step; LoRA adapts every attention and MLP projection at --rank with a frozen base in
--base-dtype. Reported: median step time over --steps, trained state (params + AdamW moments) and frozen
base bytes.
"""
import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxalign import lora  # noqa: E402
from jaxalign.config import apply_overrides, base_config  # noqa: E402
from jaxalign.models import presets  # noqa: E402
from jaxalign.parallel import mesh as mesh_lib  # noqa: E402
from jaxalign.train import run as run_lib  # noqa: E402
from jaxalign.train import state as state_lib  # noqa: E402
from jaxalign.train.registry import get_task  # noqa: E402
from jaxalign.train.step import make_train_step  # noqa: E402

SMALL = presets.PRESETS["small"]


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def bench(args, rank: int):
    cfg = apply_overrides(base_config(), [f"lora.rank={rank}", f"lora.base_dtype={args.base_dtype}",
                                          f"train.batch_size={args.batch}", "mesh.shape=(1,-1,1)"])
    model_cfg = (presets.get_preset(args.preset) if args.preset else SMALL).replace(
        dtype=args.dtype, param_dtype="float32", remat=args.remat)
    s = lora.spec(cfg)
    if s:
        model_cfg = lora.adapted_config(model_cfg, s)
    mesh, rules = mesh_lib.make_mesh(cfg.mesh.shape), mesh_lib.normalize_rules(None)
    task = get_task("sft")
    # the run's own pieces without data (the batch is random): slots, optimizer, shardings, frozen base
    run = run_lib.Run(cfg, task, print, mesh, rules, "", None, None, None, model_cfg=model_cfg, lora_spec=s)
    run_lib.state_spec(run)
    run.frozen = frozen = run_lib.frozen_base(run) if s else None
    shardings = run.shardings
    state = state_lib.init_state(run.tx, run.initial_params(), shardings, 0)
    rng = np.random.default_rng(0)
    B, T = args.batch, args.length
    host = {"input_ids": rng.integers(3, model_cfg.vocab_size, (B, T), dtype=np.int32),
            "attention_mask": np.ones((B, T), np.int32), "completion_mask": np.ones((B, T), np.int32)}
    batch = mesh_lib.shard_batch(host, mesh, rules)
    step = jax.jit(make_train_step(task, run.graphdef, run.tx, run.lr_fn, cfg, 1, run.compose),
                   out_shardings=(shardings, None), donate_argnums=0)
    times = []
    with jax.set_mesh(mesh):
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            state, report = step(state, batch, None, frozen)
            jax.block_until_ready(report["loss"])
            if i:
                times.append(time.perf_counter() - t0)
    trained = nbytes(state["params"]) + nbytes(state["opt_state"])
    return float(np.median(times)), trained, nbytes(frozen) if frozen else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="")
    p.add_argument("--dtype", default="float32", help="compute dtype")
    p.add_argument("--base-dtype", default="bfloat16", choices=lora.BASE_DTYPES)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--remat", default="none")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    full = bench(args, 0)
    low = bench(args, args.rank)
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    print(f"{jax.devices()[0].device_kind}, batch {args.batch} x {args.length}, compute {args.dtype}")
    print(f"full fine-tuning: step {full[0] * 1e3:.0f} ms, trained state {mib(full[1])}")
    print(f"LoRA r={args.rank}, {args.base_dtype} base: step {low[0] * 1e3:.0f} ms, trained state {mib(low[1])}, "
          f"frozen base {mib(low[2])}")
    print(f"LoRA/full: step time {low[0] / full[0]:.2f}x, trained state {low[1] / full[1]:.3f}x")


if __name__ == "__main__":
    main()
