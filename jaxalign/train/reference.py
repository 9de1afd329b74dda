"""The reference model of the offline preference tasks (DPO, KTO): sequence log-probs of rows and pairs, and
`reference_setup`, which hands the frozen reference to every step or precomputes its log-probs once, before
training, for only the rows the run reads (a progress bar counts them), cached in the run directory
(`ref_logps/{train,eval}.npz`, keyed by the data, the reference and everything the numbers depend on) so a
resumed run loads them.
"""
import dataclasses
import hashlib
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import JaxalignError, lora
from jaxalign.data.pipeline import Batches, stack_pairs
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.parallel import multihost
from jaxalign.train.run import reference_params
from jaxalign.train.sft import completion_logprobs


def seq_logps(model, rows, cfg):
    """Summed completion log-probs [rows] and completion token counts [rows] of a batch of rows."""
    token_logps, mask = completion_logprobs(model, rows, cfg, with_stats=False)
    logps = jnp.sum(token_logps * mask, axis=-1)
    lengths = jnp.sum(mask, axis=-1)
    return logps, lengths


def pair_logps(model, batch, cfg):
    """(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths) from one forward over
    [chosen; rejected]."""
    logps, lengths = seq_logps(model, stack_pairs(batch), cfg)
    B = batch["chosen_input_ids"].shape[0]
    return logps[:B], logps[B:], lengths[:B], lengths[B:]


def _ref_model(model, aux):
    return nnx.merge(lora.reference_graphdef(model.config, aux["ref"]), aux["ref"])


CACHE_VERSION = 1  # bump when what the cached numbers depend on changes


def reference_setup(section: str):
    """Task.setup for methods with a reference model: load it (frozen, sharded like the policy), and
    either hand it to every step or precompute its log-probs once and drop it.

    Precomputed: only the rows the run reads (the train batches of its train.steps steps, the eval batches
    it evaluates), cached in run_dir/ref_logps/{train,eval}.npz under the data's cache key and the reference's
    identity (reference_identity): a resumed run, or another with the same data and reference, loads them and
    computes only rows it lacks; the reference is not even loaded when nothing is missing."""

    def setup(run):
        c = run.cfg[section]
        if not c.precompute_ref_logps:
            return {"ref": reference_params(run, source=c.ref_path or None)}
        identity = reference_identity(run, c.ref_path or None)
        todo = []
        for name, data, rows in needed_rows(run):
            cached = load_cached(cache_path(run, name), data_key(data, identity), len(data), run.log)
            if not _everywhere(cached is not None):  # the processes must compute the same rows
                cached = None
            if not _everywhere(cached is not None and bool(cached[2][rows].all())):
                todo.append((name, data, rows, cached))
                continue
            _attach(data, cached)
            run.log(f"reference log-probs ({name}): {len(rows)} of {len(data)} examples loaded from "
                    f"{cache_path(run, name)}")
        if todo:
            ref = reference_params(run, source=c.ref_path or None)
            graphdef = lora.reference_graphdef(run.model_cfg, ref)
            for name, data, rows, cached in todo:
                chosen, rejected, done = cached if cached is not None else _empty(len(data))
                missing = rows[~done[rows]]
                a, b = reference_logps(graphdef, ref, data, missing, run.cfg, run.mesh, run.rules,
                                       desc=f"reference log-probs ({name})")
                chosen[missing], rejected[missing], done[missing] = a[missing], b[missing], True
                path = cache_path(run, name)
                if path:
                    write_cached(path, data_key(data, identity), (chosen, rejected, done))
                _attach(data, (chosen, rejected, done))
                run.log(f"precomputed reference log-probs for {len(missing)} of {len(data)} examples ({name}: "
                        f"{len(rows)} read by the run){'; cached in ' + path if path else ''}")
        return None

    return setup


def needed_rows(run):
    """[(name, data, example indices)]: the train rows of the run's train.steps batches (from step 0: a
    resumed run reads a subset) and the eval rows of one eval pass (train.eval_batches of it), in the orders
    loop.train and hooks.evaluate read them."""
    out = [("train", run.train_data, run.train_batches().visits(run.cfg.train.steps))]
    if run.eval_data is not None:
        it, n = run.eval_batches()
        out.append(("eval", run.eval_data, it.visits(n)))
    return out


def reference_logps(graphdef, ref, data, rows, cfg, mesh, rules, desc="reference log-probs"):
    """(chosen, rejected) reference log-probs [len(data)] of examples `rows` (NaN elsewhere): batches of
    train.batch_size over those rows in dataset order (all rows: the same batches as one ordered pass)."""
    from tqdm import tqdm

    @jax.jit
    def run(params, batch):
        cw, cl, _, _ = pair_logps(nnx.merge(graphdef, params), batch, cfg)
        return cw, cl

    chosen, rejected, _ = _empty(len(data))
    if not len(rows):
        return chosen, rejected
    rows = np.asarray(rows)
    whole = len(rows) == len(data)
    subset = data.dataset if whole else data.dataset.select(rows)
    once = dataclasses.replace(data, dataset=subset, files=[(p, 1.0) for p, _ in data.files], columns={})
    it = Batches(once, cfg.train.batch_size, shuffle=False, epochs=1, drop_last=False, buckets=cfg.data.buckets,
                 process_index=jax.process_index(), process_count=jax.process_count())
    bar = tqdm(total=len(rows), desc=desc, unit="pair", mininterval=1.0, dynamic_ncols=True,
               disable=not cfg.train.progress or jax.process_index() != 0)
    try:
        for host in it:
            keys = [k for k, v in host.items() if isinstance(v, np.ndarray) and k != "weight"]
            with jax.set_mesh(mesh):
                a, b = run(ref, mesh_lib.shard_batch({k: host[k] for k in keys}, mesh, rules))
                index = mesh_lib.shard_batch({"index": host["index"]}, mesh, rules)["index"]
            a, b, index = mesh_lib.to_host(a), mesh_lib.to_host(b), mesh_lib.to_host(index)
            real = index >= 0
            at = index[real] if whole else rows[index[real]]
            chosen[at], rejected[at] = a[real], b[real]
            bar.update(int(real.sum()))
    finally:
        bar.close()
    return chosen, rejected


def _empty(n):
    return np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32), np.zeros(n, bool)


def _attach(data, cached):
    """Rows not computed stay NaN (check_reference_rows stops a batch that would read one)."""
    chosen, rejected, _ = cached
    data.columns.update({"ref_chosen_logps": chosen, "ref_rejected_logps": rejected})


def check_reference_rows(run, host):
    """Task.host_batch: a batch never reads a reference log-prob that was not precomputed (NaN)."""
    if "ref_chosen_logps" in host:
        bad = (host["weight"] > 0) & (np.isnan(host["ref_chosen_logps"]) | np.isnan(host["ref_rejected_logps"]))
        if bad.any():
            raise JaxalignError(f"examples {host['index'][bad][:8].tolist()} have no precomputed reference "
                                f"log-probs (only the rows the run reads are computed)")
    return host


# ------------------------------------------------------------------------- the reference log-prob cache

def cache_path(run, name: str):
    return os.path.join(run.cfg.run_dir, "ref_logps", f"{name}.npz") if run.cfg.get("run_dir") else None


def _fingerprint(path: str) -> list:
    """(relative path, size, mtime) of every file of a model directory (or file): a changed checkpoint shows."""
    if not os.path.exists(path):
        return []
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return [(os.path.relpath(p, path), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]


def reference_identity(run, ref_path=None) -> dict:
    """What the reference's numbers depend on besides the data: where its weights come from (ref_path, else
    the starting model; from scratch: the seed) and that source's files' sizes and mtimes, the config it runs
    with (LoRA: the base's dtype), and how it is batched and laid out (batch size, buckets, logprob chunk,
    mesh): a resumed run with the same identity gets bit-identical values from the cache."""
    cfg = run.cfg
    source = ref_path or cfg.init_from or cfg.model.path
    base = bool(run.lora_spec) and not ref_path
    return {
        "version": CACHE_VERSION,
        "source": os.path.abspath(source) if source and os.path.exists(source) else source,
        "files": _fingerprint(source) if source else [],
        "seed": None if source else cfg.seed,
        "model": json.loads(run.model_cfg.without_lora().to_json()),
        "lora_base": [run.lora_spec.base_dtype, bool(run.model_cfg.quantized)] if base else None,
        "batch_size": cfg.train.batch_size,
        "buckets": list(cfg.data.buckets) if cfg.data.buckets else None,
        "logprob_chunk": cfg.train.logprob_chunk,
        "mesh": {str(k): int(v) for k, v in dict(run.mesh.shape).items()} if run.mesh is not None else None,
        "rules": repr(run.rules),
    }


def data_key(data, identity: dict) -> str:
    """One hash of the data's content (its tokenised cache key) and the reference's identity."""
    content = os.path.basename(data.cache_path) if data.cache_path else getattr(data.dataset, "_fingerprint", "")
    text = json.dumps({"data": content, "examples": len(data), "reference": identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def load_cached(path, key: str, n: int, log):
    """(chosen, rejected, computed) from a cache file made for `key`, else None (absent, stale or unreadable)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = str(f["key"])
            out = (f["chosen"].astype(np.float32), f["rejected"].astype(np.float32), f["computed"].astype(bool))
    except (OSError, KeyError, ValueError) as e:
        log(f"reference log-probs: ignoring unreadable {path} ({e})")
        return None
    if stored != key or any(len(a) != n for a in out):
        log(f"reference log-probs: {path} was made for other data or another reference; recomputing")
        return None
    return out


def write_cached(path, key: str, cached):
    """Atomically (a temporary file, then os.replace), by process 0; every process waits for it."""
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
        try:
            chosen, rejected, computed = cached
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.asarray(key), chosen=chosen, rejected=rejected, computed=computed)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    if jax.process_count() > 1:
        multihost.barrier("ref_logps")


def _everywhere(ok: bool) -> bool:
    """True when every process has it (a process that must compute makes them all compute: it is collective)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost.allgather(np.asarray([int(ok)], np.int32)).min())
