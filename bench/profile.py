"""The top XLA ops of a `jax.profiler` trace: `python -m bench.profile TRACE_DIR [--top 15] [--steps N]`.

Reads the newest `*.xplane.pb` under TRACE_DIR (jax's own reader, no TensorBoard needed) and sums the time of
each XLA op: on GPU/TPU the device planes' "XLA Ops" lines, on CPU the XLA worker threads' op events (which
XLA:CPU only emits with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true; `bench.run --profile` sets it). Ops
are also grouped by kind (the op name without its `.N` suffix: `fusion`, `ynn_fusion`, `cudnn...`).
`bench.run --profile DIR` traces every kind's timed steps and prints this.
"""
import argparse
import collections
import glob
import os
import re

CPU_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_SKIP = ("ThunkExecutor", "SlinkyThreadPool", "$", "end: ")
_CONTAINER = re.compile(r"(while|conditional|call)(\.\d+)?$")  # their bodies' ops are counted themselves


def op_times(trace_dir: str) -> collections.Counter:
    """{op name: seconds} summed over the newest trace under trace_dir."""
    from jax._src.lib import _profile_data
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = _profile_data.ProfileData.from_file(files[-1])
    times = collections.Counter()
    for plane in data.planes:
        device = plane.name.startswith("/device:")
        for line in plane.lines:
            if (device and line.name == "XLA Ops") or (not device and "XLAEigen" in line.name):
                for ev in line.events:
                    if not ev.name.startswith(_SKIP) and not _CONTAINER.match(ev.name):
                        times[ev.name] += ev.duration_ns * 1e-9
    return times


def by_kind(times: collections.Counter) -> collections.Counter:
    kinds = collections.Counter()
    for name, t in times.items():
        kinds[re.sub(r"\.\d+$", "", name)] += t
    return kinds


def report(times: collections.Counter, top: int = 15, steps: int = 1) -> str:
    total = sum(times.values())
    if not total:
        return "no XLA op events in the trace (on CPU set XLA_FLAGS=" + CPU_FLAG + " before JAX starts)"
    lines = [f"XLA ops: {total / steps * 1e3:.1f} ms a step in all; by kind:"]
    lines += [f"  {t / steps * 1e3:9.2f} ms {t / total:6.1%}  {k}" for k, t in by_kind(times).most_common(top)]
    lines.append("top ops:")
    lines += [f"  {t / steps * 1e3:9.2f} ms {t / total:6.1%}  {k}" for k, t in times.most_common(top)]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--steps", type=int, default=1, help="divide the times by this many steps")
    args = p.parse_args(argv)
    print(report(op_times(args.trace_dir), args.top, args.steps))


if __name__ == "__main__":
    main()
