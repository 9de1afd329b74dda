"""Tokenise, cache and batch datasets.

prepare(): records (formats.py) -> rendered and tokenised rows (templates.py; per kind: kinds.py) -> a
`datasets` Dataset, cached on disk under a key made of the data files' content, the tokenizer files, the
chat template and the data config; a re-run loads it, any change re-tokenises. What was truncated, dropped
or skipped is counted and reported.

Batches: seeded epochs (per-file sampling weights), a (epoch, position) state that a checkpoint stores so a
resumed run sees the same batches, and per-host slices of every global batch, collated by the data's kind
(kinds.py: optional packing of SFT rows, right padding to a few fixed lengths (buckets), left-padded prompts
for sampling).
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from typing import Optional

import numpy as np

from jaxalign import JaxalignError
from jaxalign.data import formats, templates
from jaxalign.data.kinds import KINDS, Source

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

def tokenize(renderer: templates.Renderer, ex: dict, spec: DataSpec) -> dict:
    """One normalised example -> a row of token ids; `truncated` / `dropped` say what the limits did."""
    return KINDS[spec.kind].tokenize(renderer, ex, spec)


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


@contextlib.contextmanager
def quiet_datasets():
    """No `datasets` progress bars ("Map", "Filter", "Saving the dataset ...") inside: jaxalign reports what it
    did itself. The global switch is restored afterwards, so a caller's own `datasets` use keeps its bars; an
    explicit HF_DATASETS_DISABLE_PROGRESS_BARS=0 is respected (silently)."""
    import datasets
    if datasets.are_progress_bars_disabled():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cannot disable progress bars" (the variable says 0)
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if datasets.are_progress_bars_disabled():
            datasets.enable_progress_bars()


def prepare(files, spec: DataSpec, tokenizer, tokenizer_dir: str, cache_dir: Optional[str] = None,
            num_proc: int = 1, log=print) -> Prepared:
    """Tokenise `files` ([(path, weight)] or a `data.train_files` string), or load them from the cache."""
    with quiet_datasets():
        return _prepare(files, spec, tokenizer, tokenizer_dir, cache_dir, num_proc, log)


def _prepare(files, spec, tokenizer, tokenizer_dir, cache_dir, num_proc, log) -> Prepared:
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
            return {**KINDS[spec.kind].empty_row(), "error": str(e), "dropped": True, "truncated": False,
                    "length": 0}

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
        if packing and not KINDS[data.spec.kind].packs:
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
        self.source = Source(data.dataset, self.lengths, data.pad_id, self.buckets, packing)
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

    def visits(self, n_batches: int) -> np.ndarray:
        """The example indices (sorted, unique; every process's rows) that the next `n_batches` global batches
        read from the current state, which is left as it is: what n training steps will see (__next__'s
        order and epoch rollover)."""
        seen = np.zeros(len(self.lengths), bool)
        epoch, position, left = self.epoch, self.position, int(n_batches)
        while left > 0 and not seen.all():
            if self.batches_per_epoch(epoch) == 0:  # __next__ raises here
                break
            if position >= self.batches_per_epoch(epoch):
                epoch, position = epoch + 1, 0
            if self.epochs is not None and epoch >= self.epochs:
                break
            take = min(left, self.batches_per_epoch(epoch) - position)
            units = self.units(epoch)[position * self.B:(position + take) * self.B]
            seen[[i for u in units for i in u]] = True
            position, left = position + take, left - take
        return np.flatnonzero(seen)

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
    def collate(self, units, local: slice) -> dict:
        """Rows `local` of the global batch `units` (see kinds.Kind.collate)."""
        return KINDS[self.kind].collate(units, local, self.source)


# ------------------------------------------------------------------------------------- from config

def spec_from_config(cfg, kind: str) -> DataSpec:
    """The DataSpec of a config's data section for records of `kind` (a kinds.KINDS name: the task's)."""
    d = cfg.data
    return DataSpec(kind, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                    truncation=d.truncation, on_error=d.on_error)


def tokenizer_dir(cfg) -> str:
    """Where a config's tokenizer lives: tokenizer.path, else the model it starts from."""
    return cfg.tokenizer.path or cfg.init_from or cfg.model.path


def prepare_from_config(cfg, split: str = "train", tokenizer=None, log=print, *, kind: str) -> Optional[Prepared]:
    """The tokenised `data.train_files` or `data.eval_files` of a config (None when not set), as `kind`
    records (the task's data kind: train.task.Task.data_kind)."""
    files = cfg.data.train_files if split == "train" else cfg.data.eval_files
    if not files:
        return None
    tok_dir = tokenizer_dir(cfg)
    if not tok_dir:
        raise JaxalignError("tokenizer.path (or model.path / init_from) is not set")
    tokenizer = tokenizer or templates.load_tokenizer(tok_dir, cfg.tokenizer.chat_template or None)
    return prepare(files, spec_from_config(cfg, kind), tokenizer, tok_dir, cfg.data.cache_dir or None,
                   cfg.data.num_proc, log)
