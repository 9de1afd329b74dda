"""The `jaxalign` command. Subcommands are added as their features land (sample, serve, bench); today: convert, prepare, train, quickstart, plot.

User errors (bad files, configs, checkpoints) print one line `jaxalign: error: ...` and exit 2.
"""
import argparse
import os
import sys
import time

from jaxalign import JaxalignError, __version__


def _mesh_shape(text: str):
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected data,fsdp,model such as 1,-1,1") from None
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three sizes data,fsdp,model")
    return shape


def cmd_convert(args):
    import jax

    from jaxalign import models
    from jaxalign.parallel.mesh import make_mesh

    start = time.time()
    if os.path.exists(args.out) and not args.overwrite:
        raise JaxalignError(f"{args.out}: already exists (pass --overwrite to replace it)")
    mesh = make_mesh(args.mesh)
    src = args.from_hf or args.to_hf
    lm = models.from_pretrained(src, param_dtype=args.param_dtype, mesh=mesh)
    n = sum(x.size for x in jax.tree.leaves(lm.params))
    if args.from_hf:
        lm.save(args.out, overwrite=args.overwrite)
        what = "jaxalign model"
    else:
        lm.save_pretrained(args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        what = "HF checkpoint"
    print(f"wrote {what} {args.out}: {lm.config.model_type}, {n:,} params, {lm.config.param_dtype}, "
          f"mesh {dict(mesh.shape)}, {time.time() - start:.1f}s")


def cmd_prepare(args):
    from jaxalign.config import load_config
    from jaxalign.data import pipeline

    cfg = load_config(args.config, args.overrides)
    for split in ("train", "eval"):
        data = pipeline.prepare_from_config(cfg, split)
        if data is not None:
            print(f"{split}: {len(data)} examples cached at {data.cache_path}")


def cmd_train(args):
    from jaxalign.config import load_config
    from jaxalign.train import get_task
    from jaxalign.train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, get_task(cfg.task))
    summary = {**result.metrics, **result.eval_metrics}
    print(f"done: step {result.step} in {result.run_dir}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in summary.items() if k in ("loss", "eval/loss", "eval/exact_match",
                                                             "token_accuracy", "tokens_per_sec")))


def cmd_quickstart(args):
    from jaxalign import quickstart
    quickstart.run(args.run_dir)


def cmd_plot(args):
    from jaxalign.plot import plot_run
    print(f"wrote {plot_run(args.run_dir, args.out)}")


def build_parser():
    p = argparse.ArgumentParser(prog="jaxalign", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"jaxalign {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF checkpoint <-> jaxalign model directory",
                       description="Convert between HF (config.json + safetensors) and jaxalign model "
                                   "directories, streaming one tensor at a time into the mesh.")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="HF model directory to import")
    src.add_argument("--to-hf", metavar="DIR", help="jaxalign (or HF) model directory to export as HF")
    c.add_argument("--out", required=True, help="output directory (written atomically)")
    c.add_argument("--param-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast parameters (default: keep the stored dtype)")
    c.add_argument("--max-shard-size", default="5GB", help="HF export: largest safetensors file (5GB)")
    c.add_argument("--mesh", type=_mesh_shape, default=(1, -1, 1),
                   help="data,fsdp,model mesh to load onto (default 1,-1,1: FSDP over all devices)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train (or resume) the run a config describes",
                       description="Train the task of a recipe file in its run_dir; re-running the same "
                                   "command resumes from the latest checkpoint.")
    t.add_argument("--config", required=True, help="recipe file (get_config()); --config.a.b=v overrides")
    t.set_defaults(func=cmd_train)

    q = sub.add_parser("quickstart", help="the bundled end-to-end demo (a few minutes on CPU)",
                       description="Train a tiny LLaMA from scratch on the bundled digit-sorting task and "
                                   "print held-out exact match before and after, with samples.")
    q.add_argument("--run-dir", default="runs/quickstart", help="where the runs go (replaced each time)")
    q.set_defaults(func=cmd_quickstart)

    pl = sub.add_parser("plot", help="PNG curves of a run's metrics", description="Plot metrics.jsonl.")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    pl.set_defaults(func=cmd_plot)

    pr = sub.add_parser("prepare", help="tokenise and cache a config's datasets ahead of training",
                        description="Tokenise data.train_files and data.eval_files of a config into the "
                                    "data cache (re-used by training; invalidated by any change).")
    pr.add_argument("--config", required=True, help="recipe file (get_config()); --config.a.b=v overrides")
    pr.set_defaults(func=cmd_prepare)
    return p


def parse_args(argv=None):
    """argparse plus ml_collections-style `--config.a.b=value` overrides (collected in args.overrides)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = [], []
    for i, a in enumerate(argv):
        if a.startswith("--config."):
            item = a[len("--config."):]
            if "=" not in item and i + 1 < len(argv):
                raise SystemExit(f"jaxalign: error: write overrides as {a}=VALUE")
            overrides.append(item)
        else:
            rest.append(a)
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        args.func(args)
    except JaxalignError as e:
        print(f"jaxalign: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
