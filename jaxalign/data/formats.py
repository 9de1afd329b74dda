"""Record formats (docs/DESIGN.md §5): reading local files and validating records into normalised examples.

Every record is read with its location (`file:line` for JSON Lines, `file:row N` otherwise) so that a bad
record is reported as `data/train.jsonl:17: field 'messages[2].content': expected a string`.

Normalised examples (what templates.py renders), by kind:
    sft         {"messages": [{"role", "content"}, ...]}                       (conversation or Alpaca)
    preference  {"prompt": [msg...], "chosen": [msg...], "rejected": [msg...], "margin": float | None}
    unpaired    {"prompt": [msg...], "completion": [msg...], "label": bool}     (KTO)
    prompt      {"prompt": [msg...], "extra": "<JSON of the record's other fields>"}
"""
import glob
import json
import os
from typing import Iterator, NamedTuple

from jaxalign import JaxalignError

KINDS = ("sft", "preference", "unpaired", "prompt")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "system": "system"}
EXTENSIONS = (".jsonl", ".json", ".parquet")


class DataError(JaxalignError):
    """A bad record: names the file, line or row, and field."""


class Record(NamedTuple):
    where: str      # "path:line" (JSON Lines) or "path:row N"
    data: dict


# ------------------------------------------------------------------------------------------ files

def parse_files(spec) -> list:
    """`data.train_files`: a path, a glob, or comma-separated paths, each with an optional `:weight`.
    Returns [(path, weight)] with globs expanded (sorted); a pattern that matches nothing is an error."""
    if not spec:
        return []
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass  # a colon that is part of the path
        if weight <= 0:
            raise JaxalignError(f"data files {item!r}: weight must be positive")
        matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise JaxalignError(f"data file {path!r}: not found")
        out += [(m, weight) for m in matches]
    return out


def read_records(path: str) -> Iterator[Record]:
    """Records of one JSON, JSON Lines, Parquet file or saved `datasets` directory, with locations."""
    if os.path.isdir(path):
        import datasets
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"{path}: not a saved datasets directory ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict; point at one split's directory, e.g. {path}/train")
        for i, row in enumerate(ds):
            yield Record(f"{path}:row {i}", row)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: cannot read Parquet ({e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield Record(f"{path}:row {i}", row)
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:  # raised by normalize(), so on_error="skip" can count it
                    data = DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})")
                yield Record(f"{path}:{n}", data)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        for i, row in enumerate(data):
            yield Record(f"{path}:row {i}", row)
    else:
        raise DataError(f"{path}: unsupported data file (expected one of {', '.join(EXTENSIONS)} or a "
                        f"saved datasets directory)")


# ------------------------------------------------------------------------------------- validation

def _fail(where, field, msg):
    raise DataError(f"{where}: field {field!r}: {msg}")


def _text(where, field, value, allow_empty=False):
    if not isinstance(value, str):
        _fail(where, field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        _fail(where, field, "is empty")
    return value


def _messages(where, field, value) -> list:
    """A message list (role/from + content/value) or a plain string (one user message)."""
    if not isinstance(value, list) or not value:
        _fail(where, field, "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            _fail(where, f, f"expected an object, got {type(m).__name__}")
        role = m.get("role", m.get("from"))
        if role is None:
            _fail(where, f + ".role", "is missing")
        if role not in ROLES:
            _fail(where, f + ".role", f"unknown role {role!r} (expected one of {sorted(ROLES)})")
        role = ROLES[role]
        key = "content" if "content" in m else "value" if "value" in m else None
        if key is None:
            _fail(where, f + ".content", "is missing")
        out.append({"role": role, "content": _text(where, f"{f}.{key}", m[key],
                                                   allow_empty=role == "system")})
    return out


def _turns(where, field, value, role):
    """A prompt or completion: a string becomes one message of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": _text(where, field, value)}]
    return _messages(where, field, value)


def _need(where, data, *names):
    for n in names:
        if n in data and data[n] is not None:
            return n
    _fail(where, "|".join(names), "is missing")


def _check_conversation(where, field, msgs):
    if msgs[-1]["role"] != "assistant":
        _fail(where, f"{field}[{len(msgs) - 1}].role", "a conversation must end with an assistant turn")
    if not any(m["role"] == "assistant" for m in msgs):
        _fail(where, field, "has no assistant turn")


def _split_common_prefix(chosen, rejected):
    """TRL's implicit-prompt preference format: the shared leading messages are the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def normalize(record: Record, kind: str) -> dict:
    """Validate one record for `kind` and return its normalised example (see the module docstring)."""
    where, d = record
    if isinstance(d, DataError):
        raise d
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if kind == "sft":
        if "messages" in d or "conversations" in d:
            field = "messages" if "messages" in d else "conversations"
            msgs = _messages(where, field, d[field])
        elif "instruction" in d:
            user = _text(where, "instruction", d["instruction"])
            extra = d.get("input") or ""
            if isinstance(extra, str) and not extra.strip():
                extra = ""  # Alpaca's "input": " " means no input
            user = user + "\n\n" + _text(where, "input", extra) if extra else user
            msgs = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(where, "output", d.get("output"))}]
        else:
            _fail(where, "messages|instruction", "is missing (expected a conversation or an Alpaca record)")
        _check_conversation(where, field if "instruction" not in d else "output", msgs)
        return {"messages": msgs}
    if kind == "preference":
        for f in ("chosen", "rejected"):
            _need(where, d, f)
        pk = next((k for k in ("prompt", "context") if d.get(k) is not None), None)
        chosen = _turns(where, "chosen", d["chosen"], "assistant")
        rejected = _turns(where, "rejected", d["rejected"], "assistant")
        if pk is None:
            prompt, chosen, rejected = _split_common_prefix(chosen, rejected)
            if not prompt:
                _fail(where, "prompt", "is missing (and chosen/rejected share no leading messages)")
        else:
            prompt = _turns(where, pk, d[pk], "user")
        for f, msgs in (("chosen", chosen), ("rejected", rejected)):
            if msgs[0]["role"] != "assistant" or msgs[-1]["role"] != "assistant":
                _fail(where, f, "the completion must consist of assistant turns")
        margin = d.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            _fail(where, "margin", f"expected a number, got {margin!r}")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                "margin": None if margin is None else float(margin)}
    if kind == "unpaired":
        _need(where, d, "prompt")
        _need(where, d, "completion")
        _need(where, d, "label")
        if not isinstance(d["label"], bool):
            _fail(where, "label", f"expected true or false, got {d['label']!r}")
        completion = _turns(where, "completion", d["completion"], "assistant")
        if completion[-1]["role"] != "assistant":
            _fail(where, "completion", "the completion must end with an assistant turn")
        return {"prompt": _turns(where, "prompt", d["prompt"], "user"), "completion": completion,
                "label": d["label"]}
    if kind == "prompt":
        key = _need(where, d, "prompt", "messages")
        prompt = _turns(where, key, d[key], "user")
        if key == "messages" and prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]  # a full conversation: generate the last assistant turn afresh
        if not prompt or prompt[-1]["role"] == "assistant":
            _fail(where, key, "a prompt must end with a user or system turn")
        extra = {k: v for k, v in d.items() if k != key}
        return {"prompt": prompt, "extra": json.dumps(extra, default=str)}
    raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")


def load_examples(files, kind: str, on_error: str = "raise", log=print):
    """All normalised examples of `files` ([(path, weight)]), each with its source index and location.

    Returns (examples, file_ids, skipped): file_ids[i] indexes `files`; with on_error="skip" bad records are
    counted (and the first few logged) instead of raising.
    """
    if on_error not in ("raise", "skip"):
        raise JaxalignError(f"data.on_error={on_error!r}: expected 'raise' or 'skip'")
    examples, file_ids, skipped = [], [], 0
    for fid, (path, _) in enumerate(files):
        for rec in read_records(path):
            try:
                ex = normalize(rec, kind)
            except DataError as e:
                if on_error == "raise":
                    raise
                skipped += 1
                if skipped <= 5:
                    log(f"skipping bad record: {e}")
                continue
            ex["where"] = rec.where
            examples.append(ex)
            file_ids.append(fid)
    if skipped:
        log(f"skipped {skipped} bad records (data.on_error='skip')")
    return examples, file_ids, skipped
