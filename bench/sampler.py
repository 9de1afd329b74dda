"""Sampler throughput: jaxalign.sampling vs transformers `generate` on the same model, batch and lengths.

    python bench/sampler.py                       # CPU: a small random LLaMA, prints the tokens/s ratio
    python bench/sampler.py --preset llama3_1b --dtype bfloat16 --batch 64 --no-hf     # GPU: vs the bound

Both sides decode greedily with no EOS (every row runs max_new_tokens), after a warm-up run, from the same
left-padded prompts of mixed lengths. Tokens/s counts generated tokens. On an accelerator it also times one
decode step (from a run with N and one with 1 new tokens) against the weight-bandwidth bound: the bytes of
the parameters read once per step divided by the device's HBM bandwidth (the KV cache read is reported
beside it).
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxalign import models, sampling  # noqa: E402
from jaxalign.models import presets  # noqa: E402
from jaxalign.parallel.mesh import make_mesh  # noqa: E402

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "TPU v5 lite": 0.819e12,
                   "TPU v5e": 0.819e12, "TPU v5p": 2.765e12, "TPU v4": 1.2e12, "TPU v6": 1.64e12}

SMALL = presets.PRESETS["small"]


def model_config(args):
    if args.preset:
        cfg = presets.get_preset(args.preset)
    else:
        cfg = SMALL
    return cfg.replace(dtype=args.dtype, param_dtype=args.dtype)


def prompts(args, vocab):
    rng = np.random.default_rng(0)
    lens = rng.integers(args.prompt_len // 2, args.prompt_len + 1, size=args.batch)
    return [rng.integers(3, vocab, size=n).tolist() for n in lens]


def timed(fn, repeats):
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_jax(lm, ps, new_tokens, repeats):
    ids, mask = sampling.left_pad(ps, 0)

    def run(n):
        return lambda: jax.block_until_ready(sampling.generate(lm, ids, mask, max_new_tokens=n, temperature=0.0,
                                                               eos_token_id=-1).tokens)
    full = timed(run(new_tokens), repeats)
    prefill = timed(run(1), repeats)
    return full, prefill


def bench_hf(lm, ps, new_tokens, repeats, threads):
    import torch
    import transformers
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        lm.save_pretrained(os.path.join(d, "hf"))
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"), dtype=torch.float32).eval()
    ids, mask = sampling.left_pad(ps, 0)
    ids, mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)

    def run():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    return timed(run, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="", help="a jaxalign preset (default: a 30M-parameter LLaMA)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. a large model on GPU)")
    p.add_argument("--mesh", default="1,-1,1")
    args = p.parse_args(argv)

    cfg = model_config(args)
    mesh = make_mesh(tuple(int(x) for x in args.mesh.split(",")))
    lm = models.from_config(cfg, mesh=mesh)
    ps = prompts(args, cfg.vocab_size)
    n_tok = args.batch * args.new_tokens
    dev = jax.devices()[0]
    print(f"device {dev.device_kind} x{len(jax.devices())}, model {args.preset or 'small llama'} "
          f"{cfg.num_params() / 1e6:.1f}M params {args.dtype}, batch {args.batch}, prompts "
          f"{args.prompt_len // 2}-{args.prompt_len} tokens, {args.new_tokens} new tokens")
    full, prefill = bench_jax(lm, ps, args.new_tokens, args.repeats)
    step = (full - prefill) / max(args.new_tokens - 1, 1)
    print(f"jaxalign: {n_tok / full:,.0f} tokens/s ({full * 1e3:.1f} ms; prefill {prefill * 1e3:.1f} ms, "
          f"decode step {step * 1e3:.3f} ms)")
    if not args.no_hf:
        hf = bench_hf(lm, ps, args.new_tokens, args.repeats, threads=os.cpu_count())
        print(f"transformers generate: {n_tok / hf:,.0f} tokens/s ({hf * 1e3:.1f} ms)")
        print(f"ratio jaxalign / transformers: {hf / full:.2f}x")
    bw = next((v for k, v in HBM_BYTES_PER_S.items() if k.lower() in dev.device_kind.lower()), None)
    if bw:
        param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm.params))
        S = args.prompt_len + args.new_tokens
        kv_bytes = 2 * cfg.num_layers * args.batch * S * cfg.num_kv_heads * cfg.head_dim * np.dtype(args.dtype).itemsize
        bound = param_bytes / bw
        print(f"decode step {step * 1e3:.3f} ms vs weight-bandwidth bound {bound * 1e3:.3f} ms "
              f"({param_bytes / 1e9:.2f} GB at {bw / 1e12:.2f} TB/s): {bound / step:.0%} of the bound "
              f"(KV cache read per step at full length: {kv_bytes / 1e9:.3f} GB)")


if __name__ == "__main__":
    main()
