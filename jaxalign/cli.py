"""The `jaxalign` command: convert, prepare, train, sample, chat, quickstart, plot.

User errors (bad files, configs, checkpoints) print one line `jaxalign: error: ...` and exit 2.
"""
import argparse
import os
import sys
import time

from jaxalign import JaxalignError, __version__
from jaxalign.parallel import xla_flags


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

    from jaxalign import loading
    from jaxalign.parallel.mesh import make_mesh

    start = time.time()
    if os.path.exists(args.out) and not args.overwrite:
        raise JaxalignError(f"{args.out}: already exists (pass --overwrite to replace it)")
    mesh = make_mesh(args.mesh)
    src = args.from_hf or args.to_hf
    lm = loading.from_pretrained(src, param_dtype=args.param_dtype, mesh=mesh, adapter=args.adapter)
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
    from jaxalign.train.registry import get_task

    cfg = load_config(args.config, args.overrides)
    for split in ("train", "eval"):
        data = pipeline.prepare_from_config(cfg, split, kind=get_task(cfg.task).data_kind)
        if data is not None:
            print(f"{split}: {len(data)} examples cached at {data.cache_path}")


def cmd_train(args):
    from jaxalign.config import load_config
    from jaxalign.parallel import multihost
    from jaxalign.train.registry import get_task
    from jaxalign.train.loop import train

    cfg = load_config(args.config, args.overrides)
    target = args.dry_run and cfg.runtime.dry_run_target
    if target:  # compile for a GPU this machine may not have: the GPU's flags, JAX itself on CPU
        from jaxalign.parallel import targets
        targets.prepare_env()
    xla_flags.apply(cfg.runtime.xla_flags, cfg.runtime.extra_xla_flags, cfg.runtime.memory_fraction,
                    platform="gpu" if target else None)
    if args.dry_run:
        from jaxalign.train.dryrun import dry_run
        dry_run(cfg, get_task(cfg.task))
        return
    multihost.initialize(cfg.distributed)
    try:
        result = train(cfg, get_task(cfg.task), log=multihost.main_only(print))
    except RuntimeError as e:  # jax.errors.JaxRuntimeError (XlaRuntimeError in older jaxlibs)
        oom = out_of_memory(e, cfg)
        if oom is None:
            raise
        raise oom from None
    if not multihost.is_main():
        return
    summary = {**result.metrics, **result.eval_metrics}
    print(f"done: step {result.step} in {result.run_dir}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in summary.items() if k in ("loss", "eval/loss", "eval/exact_match",
                                                             "token_accuracy", "tokens_per_sec")))


OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory")


def out_of_memory(e: BaseException, cfg):
    """A device out-of-memory error (XLA's runtime error) as a JaxalignError saying what to lower; None for
    anything else."""
    names = {c.__name__ for c in type(e).__mro__}
    text = str(e)
    if not names & {"JaxRuntimeError", "XlaRuntimeError"} or not any(m in text for m in OOM_MARKERS):
        return None
    first = (text.strip().splitlines() or [""])[0][:160]
    t = cfg.train
    return JaxalignError(
        f"out of device memory ({first}): lower train.micro_batch_size (now {t.micro_batch_size or t.batch_size}) "
        f"or data.max_length (now {cfg.data.max_length}), set model.remat=full (now {cfg.model.remat}), or shard "
        f"the weights over more devices with a larger mesh fsdp (mesh.shape now {tuple(cfg.mesh.shape)}); "
        "`jaxalign train --dry-run` prints the per-device memory")


def _generation(args) -> dict:
    stop = tuple(int(x) for x in args.stop_token_ids.split(",") if x.strip()) if args.stop_token_ids else ()
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size, stop_token_ids=stop)


def _exists(flag: str, path: str, what: str, isdir: bool = False):
    if not (os.path.isdir(path) if isdir else os.path.exists(path)):
        raise JaxalignError(f"{flag} {path}: {what} not found")


def cmd_sample(args):
    from jaxalign.sampling import batch
    _exists("--prompts", args.prompts, "prompts file")
    _exists("--model", args.model, "model directory", isdir=True)
    start = time.time()
    n = batch.predict_file(args.model, args.prompts, args.out, batch_size=args.batch_size,
                           num_samples=args.num_samples, chat_template=args.chat_template, mesh_shape=args.mesh,
                           seed=args.seed, adapter=args.adapter, **_generation(args))
    print(f"wrote {n} rows to {args.out} in {time.time() - start:.1f}s ({n.tokens} tokens, "
          f"{n.tokens_per_sec:.1f} tok/s)")


def cmd_chat(args):
    from jaxalign.sampling import batch
    _exists("--model", args.model, "model directory", isdir=True)
    print("jaxalign chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits")
    batch.chat(args.model, system=args.system, chat_template=args.chat_template, mesh_shape=args.mesh,
               seed=args.seed, adapter=args.adapter, **_generation(args))


def _generation_flags(p, temperature):
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 = off")
    g.add_argument("--stop-token-ids", default="", help="extra stop token ids, comma-separated")
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template", default=None,
                   help="chatml, raw (no template), a .jinja file or a template string (default: the model's)")
    p.add_argument("--mesh", type=_mesh_shape, default=(1, -1, 1), help="data,fsdp,model (default 1,-1,1)")


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
    c.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to merge into the model first")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train (or resume) the run a config describes",
                       description="Train the task of a recipe file in its run_dir; re-running the same "
                                   "command resumes from the latest checkpoint.")
    t.add_argument("--config", required=True, help="recipe file (get_config()); --config.a.b=v overrides")
    t.add_argument("--dry-run", action="store_true",
                   help="print per-device memory arithmetic and compile the step on abstract params; no training")
    t.set_defaults(func=cmd_train)

    q = sub.add_parser("quickstart", help="the bundled end-to-end demo (a few minutes on CPU)",
                       description="Train a tiny LLaMA from scratch on the bundled digit-sorting task and "
                                   "print held-out exact match before and after, with samples.")
    q.add_argument("--run-dir", default="runs/quickstart", help="where the runs go (replaced each time)")
    q.set_defaults(func=cmd_quickstart)

    sa = sub.add_parser("sample", help="batch prediction: completions for a file of prompts",
                        description="Generate completions for each prompt record ({\"prompt\": ...} or "
                                    "{\"messages\": [...]}) of a JSON/JSONL file with the chat template; "
                                    "appends rows to --out and resumes where it stopped.")
    sa.add_argument("--model", required=True, help="HF, jaxalign or training-run directory")
    sa.add_argument("--prompts", required=True, help="prompt records (.jsonl, .json, .parquet)")
    sa.add_argument("--out", required=True, help="output .jsonl (rows already there are skipped)")
    sa.add_argument("--batch-size", type=int, default=32)
    sa.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    sa.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to merge into the model")
    _generation_flags(sa, temperature=1.0)
    sa.set_defaults(func=cmd_sample)

    ch = sub.add_parser("chat", help="talk to a model in the terminal",
                        description="An interactive chat with a model, using its chat template.")
    ch.add_argument("--model", required=True, help="HF, jaxalign or training-run directory")
    ch.add_argument("--system", default=None, help="a system message")
    ch.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to merge into the model")
    _generation_flags(ch, temperature=0.7)
    ch.set_defaults(func=cmd_chat)

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
        if args.func is not cmd_train:  # train applies its config's runtime.* choices
            xla_flags.apply()
        args.func(args)
    except JaxalignError as e:
        print(f"jaxalign: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
