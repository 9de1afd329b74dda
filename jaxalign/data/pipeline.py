"""Tokenise, cache and batch datasets.

prepare(): records (formats.py) -> rendered and tokenised rows (templates.py) -> a `datasets` Dataset,
cached on disk under a key made of the data files' content, the tokenizer files, the chat template and
the data config; a re-run loads it, any change re-tokenises. What was truncated, dropped or skipped is
counted and reported.

Batches: seeded epochs (per-file sampling weights), optional packing of SFT rows, right padding to a few
fixed lengths (buckets), left-padded prompts for sampling, a (epoch, position) state that a checkpoint
stores so a resumed run sees the same batches, and per-host slices of every global batch.
"""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from jaxalign import JaxalignError
from jaxalign.data import formats, templates

FORMAT_VERSION = 2  # bump when tokenisation changes, so caches made by older code are not reused
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
TRUNCATION = ("truncate", "drop")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What determines the tokenised rows (everything in the cache key)."""
    kind: str                               # sft | preference | unpaired | prompt
    max_length: int = 1024
    max_prompt_length: Optional[int] = None
    truncation: str = "truncate"            # truncate: prompts keep their end, completions are cut | drop
    on_error: str = "raise"                 # raise | skip

    def __post_init__(self):
        if self.kind not in formats.KINDS:
            raise JaxalignError(f"data kind {self.kind!r}: expected one of {formats.KINDS}")
        if self.truncation not in TRUNCATION:
            raise JaxalignError(f"data.truncation={self.truncation!r}: expected one of {TRUNCATION}")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise JaxalignError("data.max_prompt_length must be smaller than data.max_length")


# --------------------------------------------------------------------------------- tokenisation

def _cut_prompt(ids, spec):
    limit = spec.max_prompt_length or spec.max_length - 1
    if len(ids) <= limit:
        return ids, False
    return ids[len(ids) - limit:], True  # keep the end: the question sits next to the answer


def tokenize(renderer: templates.Renderer, ex: dict, spec: DataSpec) -> dict:
    """One normalised example -> a row of token ids; `truncated` / `dropped` say what the limits did."""
    where, kind, L = ex["where"], spec.kind, spec.max_length
    truncated = False
    if kind == "sft":
        ids, mask = renderer.conversation(ex["messages"], where)
        if len(ids) > L:
            ids, mask, truncated = ids[:L], mask[:L], True
        return {"input_ids": ids, "completion_mask": mask, "length": len(ids), "truncated": truncated,
                "dropped": (truncated and spec.truncation == "drop") or not any(mask)}
    if kind == "prompt":
        ids = renderer.prompt(ex["prompt"], where)
        ids, truncated = _cut_prompt(ids, spec)
        return {"prompt_ids": ids, "length": len(ids), "truncated": truncated,
                "dropped": truncated and spec.truncation == "drop", "prompt": json.dumps(ex["prompt"]),
                "extra": ex["extra"]}
    completions = ("chosen", "rejected") if kind == "preference" else ("completion",)
    row, prompt_ids = {}, None
    for name in completions:
        p, c, _ = renderer.prompt_and_completion(ex["prompt"], ex[name], where)
        if prompt_ids is not None and p != prompt_ids:
            raise formats.DataError(f"{where}: chosen and rejected render different prompts")
        prompt_ids = p
        row[f"{name}_ids"] = c
    prompt_ids, truncated = _cut_prompt(prompt_ids, spec)
    room = L - len(prompt_ids)
    for name in completions:
        c = row[f"{name}_ids"]
        if len(c) > room:
            row[f"{name}_ids"], truncated = c[:room], True
    if kind == "preference":
        row["margin"] = ex["margin"]
    else:
        row["label"] = ex["label"]
    row.update(prompt_ids=prompt_ids, truncated=truncated,
               dropped=truncated and spec.truncation == "drop",
               length=len(prompt_ids) + max(len(row[f"{n}_ids"]) for n in completions))
    return row


# The columns of a row that failed to render (counted, then filtered out), so every row has the same schema.
_EMPTY_ROW = {
    "sft": {"input_ids": [], "completion_mask": []},
    "prompt": {"prompt_ids": [], "prompt": "", "extra": ""},
    "preference": {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "margin": None},
    "unpaired": {"prompt_ids": [], "completion_ids": [], "label": False},
}


# ------------------------------------------------------------------------------------- caching

def _hash_path(h, path):
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for p in paths:
        h.update(os.path.relpath(p, path).encode() if p != path else b"")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def cache_key(files, tokenizer_dir: str, template: str, spec: DataSpec) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, dataclasses.asdict(spec), template]).encode())
    for path, _ in files:  # the path too: rows remember where they came from (error messages)
        h.update(b"\0file\0" + os.path.abspath(path).encode())
        _hash_path(h, path)
    for name in TOKENIZER_FILES:
        p = os.path.join(tokenizer_dir, name)
        if os.path.isfile(p):
            h.update(name.encode())
            _hash_path(h, p)
    return h.hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("JAXALIGN_DATA_CACHE", os.path.expanduser("~/.cache/jaxalign/data"))


@dataclasses.dataclass
class Prepared:
    dataset: object            # datasets.Dataset with the kind's columns plus file_id, where, length
    files: list                # [(path, weight)]
    spec: DataSpec
    stats: dict
    pad_id: int
    cache_path: Optional[str] = None
    # Per-example values computed after tokenisation (e.g. precomputed reference log-probs), by example
    # index; batches carry them under the same names.
    columns: dict = dataclasses.field(default_factory=dict)

    def __len__(self):
        return len(self.dataset)


def prepare(files, spec: DataSpec, tokenizer, tokenizer_dir: str, cache_dir: Optional[str] = None,
            num_proc: int = 1, log=print) -> Prepared:
    """Tokenise `files` ([(path, weight)] or a `data.train_files` string), or load them from the cache."""
    import datasets

    files = formats.parse_files(files) if not isinstance(files, list) else files
    if not files:
        raise JaxalignError("no data files given")
    renderer = templates.Renderer(tokenizer)
    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(files, tokenizer_dir, tokenizer.chat_template, spec)
    path = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(path, "stats.json")):
        with open(os.path.join(path, "stats.json")) as f:
            stats = json.load(f)
        log(f"data: cached {path} ({report(stats)})")
        return Prepared(datasets.load_from_disk(os.path.join(path, "dataset")), files, spec, stats,
                        renderer.pad_id, path)

    examples, file_ids, skipped = formats.load_examples(files, spec.kind, spec.on_error, log)
    for ex, fid in zip(examples, file_ids):
        ex["file_id"] = fid
    if not examples:
        raise JaxalignError(f"no usable records in {', '.join(p for p, _ in files)}")

    def fn(ex):
        try:
            return {**tokenize(renderer, ex, spec), "error": ""}
        except formats.DataError as e:
            if spec.on_error == "raise":
                raise
            return {**_EMPTY_ROW[spec.kind], "error": str(e), "dropped": True, "truncated": False, "length": 0}

    ds = datasets.Dataset.from_list(examples)
    ds = ds.map(fn, num_proc=num_proc if num_proc > 1 else None, desc="tokenizing",
                remove_columns=[c for c in ds.column_names if c not in ("where", "file_id")])
    errors = [e for e in ds["error"] if e]
    for e in errors[:5]:
        log(f"skipping bad record: {e}")
    stats = {"records": len(examples) + skipped, "bad_records_skipped": skipped + len(errors),
             "truncated": int(sum(t and not d for t, d in zip(ds["truncated"], ds["dropped"]))),
             "dropped_for_length": int(sum(ds["dropped"])) - len(errors)}
    ds = ds.filter(lambda d: not d, input_columns="dropped").remove_columns(["error", "dropped"])
    stats["examples"] = len(ds)
    if not len(ds):
        raise JaxalignError(f"every record was dropped or skipped ({report(stats)})")
    log(f"data: {report(stats)}")

    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir)
    try:
        ds.save_to_disk(os.path.join(tmp, "dataset"))
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(stats, f)
        if os.path.exists(path):  # a concurrent prepare of the same data finished first
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Prepared(datasets.load_from_disk(os.path.join(path, "dataset")), files, spec, stats,
                    renderer.pad_id, path)


def report(stats: dict) -> str:
    return (f"{stats['records']} records -> {stats['examples']} examples; {stats['truncated']} truncated, "
            f"{stats['dropped_for_length']} dropped for length, {stats['bad_records_skipped']} bad records "
            f"skipped")


# ------------------------------------------------------------------------------------- batching

def default_buckets(max_length: int) -> tuple:
    """Up to four padded lengths (max_length/8 ... max_length, multiples of 8): few compilations."""
    out = {max_length}
    for k in (1, 2, 3):
        b = max_length >> k
        if b >= 32:
            out.add(int(math.ceil(b / 8) * 8))
    return tuple(sorted(out))


def pack(lengths, order, max_length: int) -> list:
    """Greedy next-fit packing of examples (in `order`) into rows of at most max_length tokens."""
    rows, row, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if row and used + n > max_length:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(row)
    return rows


def _pad(seqs, length, value, left=False, dtype=np.int32):
    out = np.full((len(seqs), length), value, dtype)
    for r, s in enumerate(seqs):
        if len(s):
            if left:
                out[r, length - len(s):] = s
            else:
                out[r, :len(s)] = s
    return out


def stack_pairs(batch: dict) -> dict:
    """[chosen; rejected] stacked along the batch dim: one forward pass for both (numpy or jax arrays).
    Done after placement on devices, so the layout is global even when each host loaded its own slice."""
    if isinstance(batch["chosen_input_ids"], np.ndarray):
        concatenate = np.concatenate
    else:
        import jax.numpy as jnp
        concatenate = jnp.concatenate
    return {k: concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
            for k in ("input_ids", "attention_mask", "completion_mask")}


class Batches:
    """Iterator of host-local numpy batches over a Prepared dataset.

    Global batch b of epoch e is a fixed function of (seed, e, b); this process returns rows
    [process_index * n, (process_index + 1) * n) of it, n = batch_size / process_count. `state()` and
    `restore()` carry (epoch, position) through checkpoints. `epochs=None` cycles forever (training);
    `epochs=1, shuffle=False, drop_last=False` is one ordered eval pass whose last batch is filled with
    empty rows (`weight` 0).
    """

    def __init__(self, data: Prepared, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 packing: bool = False, buckets=None, epochs: Optional[int] = None, drop_last: bool = True,
                 process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise JaxalignError(f"batch_size {batch_size} is not divisible by {process_count} processes")
        if packing and data.spec.kind != "sft":
            raise JaxalignError("data.packing applies to SFT data only")
        self.data, self.kind, self.B = data, data.spec.kind, batch_size
        self.seed, self.shuffle, self.packing, self.epochs, self.drop_last = (
            seed, shuffle, packing, epochs, drop_last)
        self.max_length = data.spec.max_length
        self.buckets = (self.max_length,) if packing else tuple(sorted(buckets or default_buckets(
            self.max_length)))
        if self.buckets[-1] < self.max_length:
            raise JaxalignError(f"largest bucket {self.buckets[-1]} < max_length {self.max_length}")
        self.rank, self.world = process_index, process_count
        self.lengths = np.asarray(data.dataset["length"])
        self.file_ids = np.asarray(data.dataset["file_id"])
        self.epoch, self.position = 0, 0
        self._units_epoch, self._units = None, None

    # ---- order
    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        picks = []
        for fid, (_, weight) in enumerate(self.data.files):
            idx = np.flatnonzero(self.file_ids == fid)
            whole, frac = int(weight), weight - int(weight)
            picks += [idx] * whole
            if frac > 0 and len(idx):
                picks.append(rng.choice(idx, size=int(round(frac * len(idx))), replace=False))
        order = np.concatenate(picks) if picks else np.zeros(0, int)
        return rng.permutation(order) if self.shuffle else np.sort(order, kind="stable")

    def units(self, epoch: int) -> list:
        """The epoch's rows: example indices, or lists of them when packing."""
        if self._units_epoch != epoch:
            order = self._epoch_order(epoch)
            self._units = pack(self.lengths, order, self.max_length) if self.packing else [[int(i)]
                                                                                          for i in order]
            self._units_epoch = epoch
        return self._units

    def batches_per_epoch(self, epoch: int = 0) -> int:
        n = len(self.units(epoch))
        return n // self.B if self.drop_last else -(-n // self.B)

    # ---- state
    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.batches_per_epoch(self.epoch) == 0:
            raise JaxalignError(f"{len(self.units(self.epoch))} rows per epoch < batch size {self.B}")
        if self.position >= self.batches_per_epoch(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        units = self.units(self.epoch)[self.position * self.B:(self.position + 1) * self.B]
        self.position += 1
        weight = np.ones(self.B, np.float32)
        weight[len(units):] = 0
        units = units + [[]] * (self.B - len(units))
        n = self.B // self.world
        local = slice(self.rank * n, (self.rank + 1) * n)
        batch = self.collate(units, local)
        batch["weight"] = weight[local]
        if not self.packing:
            index = np.asarray([u[0] if u else -1 for u in units[local]], np.int64)
            batch["index"] = index
            for name, values in self.data.columns.items():
                batch[name] = np.where(index >= 0, values[np.maximum(index, 0)], 0).astype(values.dtype)
        return batch

    # ---- collation
    def _bucket(self, longest: int) -> int:
        return next(b for b in self.buckets if b >= longest)

    def _rows(self, col, idx):
        return [self.data.dataset[int(i)][col] for i in idx]

    def collate(self, units, local: slice) -> dict:
        ds = self.data.dataset
        pad = self.data.pad_id
        if self.kind == "sft":
            T = self._bucket(max(sum(int(self.lengths[i]) for i in u) for u in units) if units else 1)
            rows = units[local]
            ids, mask, seg, pos = [], [], [], []
            for u in rows:
                r = ds[u] if u else {"input_ids": [], "completion_mask": []}
                parts_ids = r["input_ids"] if u else []
                parts_mask = r["completion_mask"] if u else []
                ids.append([t for p in parts_ids for t in p])
                mask.append([t for p in parts_mask for t in p])
                seg.append([s + 1 for s, p in enumerate(parts_ids) for _ in p])
                pos.append([t for p in parts_ids for t in range(len(p))])
            out = {"input_ids": _pad(ids, T, pad), "attention_mask": _pad([[1] * len(s) for s in ids], T, 0),
                   "completion_mask": _pad(mask, T, 0)}
            if self.packing:
                out.update(segment_ids=_pad(seg, T, 0), positions=_pad(pos, T, 0))
            return out
        flat = [u[0] if u else None for u in units]
        if self.kind == "prompt":
            P = self._bucket(max((int(self.lengths[i]) for i in flat if i is not None), default=1))
            rows = [ds[i] if i is not None else None for i in flat[local]]
            ids = [r["prompt_ids"] if r else [] for r in rows]
            return {"input_ids": _pad(ids, P, pad, left=True),
                    "attention_mask": _pad([[1] * len(s) for s in ids], P, 0, left=True),
                    "prompt": [json.loads(r["prompt"]) if r else [] for r in rows],
                    "extra": [json.loads(r["extra"]) if r else {} for r in rows]}
        names = ("chosen", "rejected") if self.kind == "preference" else ("completion",)
        glob_rows = [ds[i] if i is not None else None for i in flat]
        if self.kind == "unpaired":  # KTO's KL point: prompt i with the completion of row i+1 of the batch
            real = [r for r in glob_rows if r is not None]
            for j, r in enumerate(real):
                r["kl_ids"] = real[(j + 1) % len(real)]["completion_ids"][:self.max_length - len(r["prompt_ids"])]
            names = names + ("kl",)
        T = self._bucket(max((len(r["prompt_ids"]) + len(r[f"{n}_ids"]) for r in glob_rows if r for n in names),
                             default=1))
        rows = glob_rows[local]
        out = {}
        for n in names:
            seqs = [r["prompt_ids"] + r[f"{n}_ids"] if r else [] for r in rows]
            cmask = [[0] * len(r["prompt_ids"]) + [1] * len(r[f"{n}_ids"]) if r else [] for r in rows]
            prefix = "" if n == "completion" else f"{n}_"
            out[f"{prefix}input_ids"] = _pad(seqs, T, pad)
            out[f"{prefix}attention_mask"] = _pad([[1] * len(s) for s in seqs], T, 0)
            out[f"{prefix}completion_mask"] = _pad(cmask, T, 0)
        if self.kind == "preference":
            out["margin"] = np.asarray([r["margin"] if r and r["margin"] is not None else 0.0 for r in rows],
                                       np.float32)
        else:
            out["label"] = np.asarray([bool(r["label"]) if r else False for r in rows])
        return out


# ------------------------------------------------------------------------------------- from config

def spec_from_config(cfg) -> DataSpec:
    from jaxalign.config import DATA_KIND
    d = cfg.data
    return DataSpec(DATA_KIND[cfg.task], max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                    truncation=d.truncation, on_error=d.on_error)


def tokenizer_dir(cfg) -> str:
    """Where a config's tokenizer lives: tokenizer.path, else the model it starts from."""
    return cfg.tokenizer.path or cfg.init_from or cfg.model.path


def prepare_from_config(cfg, split: str = "train", tokenizer=None, log=print) -> Optional[Prepared]:
    """The tokenised `data.train_files` or `data.eval_files` of a config (None when not set)."""
    files = cfg.data.train_files if split == "train" else cfg.data.eval_files
    if not files:
        return None
    tok_dir = tokenizer_dir(cfg)
    if not tok_dir:
        raise JaxalignError("tokenizer.path (or model.path / init_from) is not set")
    tokenizer = tokenizer or templates.load_tokenizer(tok_dir, cfg.tokenizer.chat_template or None)
    return prepare(files, spec_from_config(cfg), tokenizer, tok_dir, cfg.data.cache_dir or None,
                   cfg.data.num_proc, log)
