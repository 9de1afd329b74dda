"""Sampler throughput: jaxalign.sampling vs transformers `generate` on the same model, batch and lengths.

    python bench/sampler.py                       # CPU: a small random LLaMA, prints the tokens/s ratio
    python bench/sampler.py --preset llama3_1b --dtype bfloat16 --batch 64 --no-hf     # GPU: vs the bound

Both sides decode greedily with no EOS (every row runs max_new_tokens), after a warm-up run, from the same
left-padded prompts of mixed lengths. Tokens/s counts generated tokens. It also times one decode step
(from a run with N and one with 1 new tokens) against the weight-bandwidth bound: the bytes of the parameters
read once per step over the device's HBM bandwidth (on CPU: the streaming bandwidth measured in the same run).
`python -m bench.run` runs the same measurement as its `sampler` kind.
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxalign import loading, sampling  # noqa: E402
from jaxalign.models import presets  # noqa: E402
from jaxalign.parallel.mesh import make_mesh  # noqa: E402

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "TPU v5 lite": 0.819e12,
                   "TPU v5e": 0.819e12, "TPU v5p": 2.765e12, "TPU v4": 1.2e12, "TPU v6": 1.64e12}

SMALL = presets.PRESETS["small"]


def model_config(args):
    cfg = presets.get_preset(args.preset) if args.preset else SMALL
    return cfg.replace(dtype=args.dtype, param_dtype=args.dtype)


def prompts(batch: int, prompt_len: int, vocab: int):
    """Random prompts of prompt_len/2 .. prompt_len tokens (the batch is left-padded to the longest)."""
    rng = np.random.default_rng(0)
    lens = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    return [rng.integers(3, vocab, size=n).tolist() for n in lens]


def timed(fn, repeats):
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def memory_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of the default device reading a large float32 array once (a jitted sum): the CPU's measured
    streaming bandwidth, the bound of a decode step that reads every weight."""
    x = jax.numpy.ones((n_bytes // 4,), jax.numpy.float32)
    f = jax.jit(lambda a: a.sum())
    return n_bytes / timed(lambda: f(x).block_until_ready(), repeats)


def device_bandwidth() -> float:
    """The accelerator's published HBM bandwidth, or on CPU the one measured now."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return memory_bandwidth()
    return next((v for k, v in HBM_BYTES_PER_S.items() if k.lower() in dev.device_kind.lower()), None)


def measure(lm, ps, new_tokens: int, repeats: int = 3, bandwidth=None) -> dict:
    """Prefill and decode throughput of jaxalign.sampling.generate (greedy, no EOS: every row decodes
    new_tokens), and one decode step against the weight-bandwidth bound (parameter bytes / bandwidth)."""
    ids, mask = sampling.left_pad(ps, 0)

    def run(n):
        return lambda: jax.block_until_ready(sampling.generate(lm, ids, mask, max_new_tokens=n, temperature=0.0,
                                                               eos_token_id=-1).tokens)
    full = timed(run(new_tokens), repeats)
    prefill = timed(run(1), repeats)
    step = max(full - prefill, 1e-9) / max(new_tokens - 1, 1)
    B = len(ps)
    out = {"batch": B, "prompt_tokens": int(sum(map(len, ps))), "new_tokens": new_tokens, "total_s": full,
           "prefill_s": prefill, "decode_step_s": step,
           "prefill_tokens_per_sec": float(np.asarray(mask).sum()) / prefill,
           "decode_tokens_per_sec": B / step, "tokens_per_sec": B * new_tokens / full}
    if bandwidth:
        param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm.params))
        out.update(param_bytes=param_bytes, bandwidth=bandwidth, bound_s=param_bytes / bandwidth,
                   of_bound=param_bytes / bandwidth / step)
    return out


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


def report(r: dict) -> str:
    line = (f"jaxalign: {r['tokens_per_sec']:,.0f} tokens/s ({r['total_s'] * 1e3:.1f} ms); prefill "
            f"{r['prefill_tokens_per_sec']:,.0f} tokens/s ({r['prefill_s'] * 1e3:.1f} ms), decode "
            f"{r['decode_tokens_per_sec']:,.0f} tokens/s ({r['decode_step_s'] * 1e3:.3f} ms a step)")
    if "bound_s" in r:
        line += (f"; decode step vs the weight-bandwidth bound {r['bound_s'] * 1e3:.3f} ms "
                 f"({r['param_bytes'] / 1e9:.3f} GB at {r['bandwidth'] / 1e9:,.0f} GB/s): {r['of_bound']:.0%}")
    return line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="", help="a jaxalign preset (default: the `small` 27M-parameter LLaMA)")
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
    lm = loading.from_config(cfg, mesh=mesh)
    ps = prompts(args.batch, args.prompt_len, cfg.vocab_size)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind} x{len(jax.devices())}, model {args.preset or 'small'} "
          f"{cfg.num_params() / 1e6:.1f}M params {args.dtype}, batch {args.batch}, prompts "
          f"{args.prompt_len // 2}-{args.prompt_len} tokens, {args.new_tokens} new tokens")
    r = measure(lm, ps, args.new_tokens, args.repeats, device_bandwidth())
    print(report(r))
    if not args.no_hf:
        hf = bench_hf(lm, ps, args.new_tokens, args.repeats, threads=os.cpu_count())
        print(f"transformers generate: {args.batch * args.new_tokens / hf:,.0f} tokens/s ({hf * 1e3:.1f} ms); "
              f"jaxalign is {hf / r['total_s']:.2f}x faster")


if __name__ == "__main__":
    main()
