"""Record kinds (formats.KINDS) as classes: how one kind's examples become token rows (`tokenize`), the row
written for an example that failed to render (`empty_row`), and how rows become a batch (`collate`).

KINDS maps each kind's name (DataSpec.kind, configs and cache keys) to its instance. Record validation
stays in formats.py (formats.normalize, by kind); task logic (e.g. KTO's KL rows, train/preference.py)
stays out: a kind only pads, buckets and packs its own rows.
"""
import dataclasses
import json

import numpy as np

from jaxalign.data import formats


# ------------------------------------------------------------------------------------------ helpers

def cut_prompt(ids, spec):
    """A prompt cut to max_prompt_length (default max_length - 1); returns (ids, truncated)."""
    limit = spec.max_prompt_length or spec.max_length - 1
    if len(ids) <= limit:
        return ids, False
    return ids[len(ids) - limit:], True  # keep the end: the question sits next to the answer


def pad(seqs, length, value, left=False, dtype=np.int32):
    """[len(seqs), length] array of `seqs` padded with `value` on the right (or the left)."""
    out = np.full((len(seqs), length), value, dtype)
    for r, s in enumerate(seqs):
        if len(s):
            if left:
                out[r, length - len(s):] = s
            else:
                out[r, :len(s)] = s
    return out


def bucket(buckets, longest: int) -> int:
    """The smallest of the (sorted) padded lengths `buckets` that holds `longest` tokens."""
    return next(b for b in buckets if b >= longest)


@dataclasses.dataclass(frozen=True)
class Source:
    """What a kind's collate reads: the tokenised dataset, its `length` column, the pad id and the padded
    lengths (buckets) a batch may take."""
    dataset: object
    lengths: np.ndarray
    pad_id: int
    buckets: tuple
    packing: bool = False

    def bucket(self, longest: int) -> int:
        return bucket(self.buckets, longest)


@dataclasses.dataclass(frozen=True)
class BatchRows:
    """Every row of the global batch (every process's rows, not only this one's) as token-id lists, None for
    the fill rows of a last eval batch, with what padding them takes: for host-side task logic that combines
    rows across the batch (KTO's KL rows, train/preference.py). Not an array: it stays on the host."""
    prompt_ids: list
    completion_ids: list
    local: slice            # this process's rows of the batch
    pad_id: int
    buckets: tuple

    def bucket(self, longest: int) -> int:
        return bucket(self.buckets, longest)


# -------------------------------------------------------------------------------------------- kinds

class Kind:
    """One record kind. `collate(units, local, source)`: `units` are the global batch's rows, each a list of
    example indices (one, or several when packing; [] for a fill row); `local` is this process's slice of
    them. Padded lengths are chosen over the global batch, so every process gets the same shapes."""
    name = ""
    packs = False           # whether Batches may pack several examples into one row (data.packing)

    def tokenize(self, renderer, ex: dict, spec) -> dict:
        """One normalised example -> a row of token ids; `truncated` / `dropped` say what the limits did."""
        raise NotImplementedError

    def empty_row(self) -> dict:
        """The kind's columns for an example that failed to render (counted, then filtered out), so every row
        has the same schema."""
        raise NotImplementedError

    def collate(self, units, local: slice, source: Source) -> dict:
        raise NotImplementedError


class Sft(Kind):
    """Conversations: input_ids, attention_mask and completion_mask (the assistant turns) right-padded;
    when packing, several examples per row with segment_ids and positions."""
    name = "sft"
    packs = True

    def tokenize(self, renderer, ex, spec):
        L = spec.max_length
        truncated = False
        ids, mask = renderer.conversation(ex["messages"], ex["where"])
        if len(ids) > L:
            ids, mask, truncated = ids[:L], mask[:L], True
        return {"input_ids": ids, "completion_mask": mask, "length": len(ids), "truncated": truncated,
                "dropped": (truncated and spec.truncation == "drop") or not any(mask)}

    def empty_row(self):
        return {"input_ids": [], "completion_mask": []}

    def collate(self, units, local, source):
        ds, lengths = source.dataset, source.lengths
        T = source.bucket(max(sum(int(lengths[i]) for i in u) for u in units) if units else 1)
        ids, mask, seg, pos = [], [], [], []
        for u in units[local]:
            r = ds[u] if u else {"input_ids": [], "completion_mask": []}
            parts_ids = r["input_ids"] if u else []
            parts_mask = r["completion_mask"] if u else []
            ids.append([t for p in parts_ids for t in p])
            mask.append([t for p in parts_mask for t in p])
            seg.append([s + 1 for s, p in enumerate(parts_ids) for _ in p])
            pos.append([t for p in parts_ids for t in range(len(p))])
        out = {"input_ids": pad(ids, T, source.pad_id), "attention_mask": pad([[1] * len(s) for s in ids], T, 0),
               "completion_mask": pad(mask, T, 0)}
        if source.packing:
            out.update(segment_ids=pad(seg, T, 0), positions=pad(pos, T, 0))
        return out


class Prompt(Kind):
    """Prompts for sampling: input_ids and attention_mask left-padded, with the prompt messages and the
    record's other fields (`extra`) as per-row lists."""
    name = "prompt"

    def tokenize(self, renderer, ex, spec):
        ids = renderer.prompt(ex["prompt"], ex["where"])
        ids, truncated = cut_prompt(ids, spec)
        return {"prompt_ids": ids, "length": len(ids), "truncated": truncated,
                "dropped": truncated and spec.truncation == "drop", "prompt": json.dumps(ex["prompt"]),
                "extra": ex["extra"]}

    def empty_row(self):
        return {"prompt_ids": [], "prompt": "", "extra": ""}

    def collate(self, units, local, source):
        ds, flat = source.dataset, [u[0] if u else None for u in units]
        P = source.bucket(max((int(source.lengths[i]) for i in flat if i is not None), default=1))
        rows = [ds[i] if i is not None else None for i in flat[local]]
        ids = [r["prompt_ids"] if r else [] for r in rows]
        return {"input_ids": pad(ids, P, source.pad_id, left=True),
                "attention_mask": pad([[1] * len(s) for s in ids], P, 0, left=True),
                "prompt": [json.loads(r["prompt"]) if r else [] for r in rows],
                "extra": [json.loads(r["extra"]) if r else {} for r in rows]}


class _PromptCompletions(Kind):
    """A prompt and one or more completions of it: each completion a right-padded row (prompt + completion)
    whose completion_mask covers the completion; one padded length for all of them."""
    completions: tuple = ()

    def prefix(self, name: str) -> str:
        """The batch keys' prefix of a completion's rows."""
        return f"{name}_"

    def scores(self, ex: dict) -> dict:
        """The example's per-row value columns (margin, label)."""
        raise NotImplementedError

    def tokenize(self, renderer, ex, spec):
        where, L = ex["where"], spec.max_length
        row, prompt_ids = {}, None
        for name in self.completions:
            p, c, _ = renderer.prompt_and_completion(ex["prompt"], ex[name], where)
            if prompt_ids is not None and p != prompt_ids:
                raise formats.DataError(f"{where}: chosen and rejected render different prompts")
            prompt_ids = p
            row[f"{name}_ids"] = c
        prompt_ids, truncated = cut_prompt(prompt_ids, spec)
        room = L - len(prompt_ids)
        for name in self.completions:
            c = row[f"{name}_ids"]
            if len(c) > room:
                row[f"{name}_ids"], truncated = c[:room], True
        row.update(self.scores(ex))
        row.update(prompt_ids=prompt_ids, truncated=truncated,
                   dropped=truncated and spec.truncation == "drop",
                   length=len(prompt_ids) + max(len(row[f"{n}_ids"]) for n in self.completions))
        return row

    def collate(self, units, local, source):
        ds = source.dataset
        glob_rows = [ds[u[0]] if u else None for u in units]
        T = source.bucket(max((len(r["prompt_ids"]) + len(r[f"{n}_ids"])
                               for r in glob_rows if r for n in self.completions), default=1))
        rows = glob_rows[local]
        out = {}
        for n in self.completions:
            seqs = [r["prompt_ids"] + r[f"{n}_ids"] if r else [] for r in rows]
            cmask = [[0] * len(r["prompt_ids"]) + [1] * len(r[f"{n}_ids"]) if r else [] for r in rows]
            prefix = self.prefix(n)
            out[f"{prefix}input_ids"] = pad(seqs, T, source.pad_id)
            out[f"{prefix}attention_mask"] = pad([[1] * len(s) for s in seqs], T, 0)
            out[f"{prefix}completion_mask"] = pad(cmask, T, 0)
        out.update(self.extra_columns(rows, glob_rows, local, source))
        return out

    def extra_columns(self, rows, glob_rows, local, source) -> dict:
        raise NotImplementedError


class Preference(_PromptCompletions):
    """Pairs: chosen_* and rejected_* rows (stack_pairs puts them in one forward pass) and `margin`."""
    name = "preference"
    completions = ("chosen", "rejected")

    def scores(self, ex):
        return {"margin": ex["margin"]}

    def empty_row(self):
        return {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "margin": None}

    def extra_columns(self, rows, glob_rows, local, source):
        return {"margin": np.asarray([r["margin"] if r and r["margin"] is not None else 0.0 for r in rows],
                                     np.float32)}


class Unpaired(_PromptCompletions):
    """Unpaired completions (KTO): one row each and its boolean `label`; plus `batch_rows`, the global
    batch's prompts and completions as token lists (BatchRows), for tasks that pair rows across the batch."""
    name = "unpaired"
    completions = ("completion",)

    def prefix(self, name):
        return ""

    def scores(self, ex):
        return {"label": ex["label"]}

    def empty_row(self):
        return {"prompt_ids": [], "completion_ids": [], "label": False}

    def extra_columns(self, rows, glob_rows, local, source):
        return {"label": np.asarray([bool(r["label"]) if r else False for r in rows]),
                "batch_rows": BatchRows([r["prompt_ids"] if r else None for r in glob_rows],
                                        [r["completion_ids"] if r else None for r in glob_rows],
                                        local, source.pad_id, source.buckets)}


KINDS = {k.name: k for k in (Sft(), Preference(), Unpaired(), Prompt())}
assert tuple(KINDS) == formats.KINDS, (tuple(KINDS), formats.KINDS)
