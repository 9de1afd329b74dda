"""prepare() and Batches: lengths and truncation, buckets, packing (and no cross-segment attention in a real
model), preference / prompt / unpaired batches, the seeded resumable iterator, per-process slices, eval
passes, file weights, the content-keyed cache, SentencePiece tokenizers, configs and `jaxalign prepare`."""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxalign import JaxalignError
from jaxalign.data import formats, kinds, pipeline, templates
from jaxalign.data.pipeline import Batches, DataSpec
from tests.tokenizers_util import CORPUS, make_tokenizer, write_jsonl

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
EOS, PAD = 2, 0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok") / "tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return templates.load_tokenizer(tok_dir)


def prep(tmp_path, tok, tok_dir, files, kind, log=None, **spec):
    return pipeline.prepare(files, DataSpec(kind, **spec), tok, tok_dir, cache_dir=str(tmp_path / "cache"),
                            log=log if log is not None else (lambda m: None))


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def chatml_prompt(tok, q):
    return enc(tok, f"<|im_start|>user\n{q}<|im_end|>\n") + enc(tok, "<|im_start|>assistant\n")


def chatml_reply(tok, a):
    return enc(tok, f"{a}<|im_end|>\n") + [EOS]


def sft_row(tok, q, a):
    p, c = chatml_prompt(tok, q), chatml_reply(tok, a)
    return p + c, [0] * len(p) + [1] * len(c)


def right_pad(rows, T, value=0):
    out = np.full((len(rows), T), value, np.int32)
    for r, s in enumerate(rows):
        out[r, :len(s)] = s
    return out


def sft_records(n):
    return [{"messages": [U(f"Hi {i}"), A(" ".join(["Yes."] * (1 + i % 4)))]} for i in range(n)]


def sft_expected(tok, records):
    return [sft_row(tok, r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert set(x) == set(y)
        for k in x:
            if isinstance(x[k], np.ndarray):
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            else:
                assert x[k] == y[k], k


def row_keys(batch):
    """Each row's real tokens as a tuple (identifies an example)."""
    return [tuple(ids[m.astype(bool)]) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


# --------------------------------------------------------------------------------------------- lengths

def test_sft_truncate_and_drop(tmp_path, tok, tok_dir):
    records = [{"messages": [U("Hi"), A("Yes.")]},
               {"messages": [U("Hi"), A("Yes. No. Maybe. Thanks! Yes. No. Maybe.")]},   # reply cut
               {"messages": [U("The quick brown fox jumps over the lazy dog."), A("Yes.")]}]  # reply cut off entirely
    rows = sft_expected(tok, records)
    L = 30
    assert len(rows[0][0]) <= L < len(rows[1][0]) and len(chatml_prompt(tok, records[2]["messages"][0]["content"])) >= L
    path = write_jsonl(tmp_path / "a.jsonl", records)
    data = prep(tmp_path, tok, tok_dir, path, "sft", max_length=L)
    assert data.stats["records"] == 3 and data.stats["examples"] == 2
    assert data.stats["dropped_for_length"] == 1 and data.stats["bad_records_skipped"] == 0
    assert data.stats["truncated"] >= 1
    b = next(Batches(data, 2, shuffle=False, epochs=1, buckets=(16, 32)))
    ids1, mask1 = rows[1][0][:L], rows[1][1][:L]
    np.testing.assert_array_equal(b["input_ids"], right_pad([rows[0][0], ids1], 32, PAD))
    np.testing.assert_array_equal(b["completion_mask"], right_pad([rows[0][1], mask1], 32))
    np.testing.assert_array_equal(b["attention_mask"], right_pad([[1] * len(rows[0][0]), [1] * L], 32))
    assert max(data.dataset["length"]) <= L

    data = prep(tmp_path, tok, tok_dir, path, "sft", max_length=L, truncation="drop")
    assert data.stats["examples"] == 1 and data.stats["dropped_for_length"] == 2
    np.testing.assert_array_equal(data.dataset["input_ids"][0], rows[0][0])


def test_preference_truncation_keeps_prompt_end(tmp_path, tok, tok_dir):
    long_q = "The quick brown fox jumps over the lazy dog."
    records = [{"prompt": "Hi", "chosen": "Yes.", "rejected": "No."},
               {"prompt": long_q, "chosen": "Yes. No. Maybe. Thanks! Yes. No.", "rejected": "No."}]
    L, P = 36, 20
    path = write_jsonl(tmp_path / "p.jsonl", records)
    data = prep(tmp_path, tok, tok_dir, path, "preference", max_length=L, max_prompt_length=P)
    assert data.stats["truncated"] == 1 and data.stats["examples"] == 2 and data.stats["dropped_for_length"] == 0
    p0, p1 = chatml_prompt(tok, "Hi"), chatml_prompt(tok, long_q)
    assert len(p0) <= P < len(p1)
    p1 = p1[-P:]  # the prompt keeps its end (the question next to the answer)
    c1 = chatml_reply(tok, "Yes. No. Maybe. Thanks! Yes. No.")
    assert len(c1) > L - P
    chosen = [p0 + chatml_reply(tok, "Yes."), p1 + c1[:L - P]]
    rejected = [p0 + chatml_reply(tok, "No."), p1 + chatml_reply(tok, "No.")]
    b = next(Batches(data, 2, shuffle=False, epochs=1, buckets=(16, 36)))
    np.testing.assert_array_equal(b["chosen_input_ids"], right_pad(chosen, L, PAD))
    np.testing.assert_array_equal(b["rejected_input_ids"], right_pad(rejected, L, PAD))
    np.testing.assert_array_equal(b["chosen_completion_mask"], right_pad(
        [[0] * len(p0) + [1] * (len(chosen[0]) - len(p0)), [0] * P + [1] * (L - P)], L))
    np.testing.assert_array_equal(b["rejected_completion_mask"], right_pad(
        [[0] * len(p0) + [1] * (len(rejected[0]) - len(p0)), [0] * P + [1] * (len(rejected[1]) - P)], L))
    # without max_prompt_length the prompt may take max_length - 1
    data = prep(tmp_path, tok, tok_dir, path, "preference", max_length=24)
    row = data.dataset[1]
    assert row["prompt_ids"] == chatml_prompt(tok, long_q)[-23:] and row["chosen_ids"] == c1[:1]

    data = prep(tmp_path, tok, tok_dir, path, "preference", max_length=L, max_prompt_length=P, truncation="drop")
    assert data.stats["examples"] == 1 and data.stats["dropped_for_length"] == 1
    assert data.dataset["prompt_ids"] == [p0]


def test_prompt_truncation(tmp_path, tok, tok_dir):
    long_q = "The quick brown fox jumps over the lazy dog."
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi"}, {"prompt": long_q}])
    full = chatml_prompt(tok, long_q)
    data = prep(tmp_path, tok, tok_dir, path, "prompt", max_length=32, max_prompt_length=20)
    assert data.stats["truncated"] == 1 and data.dataset["prompt_ids"] == [chatml_prompt(tok, "Hi"), full[-20:]]
    data = prep(tmp_path, tok, tok_dir, path, "prompt", max_length=32, max_prompt_length=20, truncation="drop")
    assert data.stats["dropped_for_length"] == 1 and data.dataset["prompt_ids"] == [chatml_prompt(tok, "Hi")]


def test_truncated_count_excludes_dropped_rows(tmp_path, tok, tok_dir):
    records = [{"messages": [U("Hi"), A("Yes.")]},
               {"messages": [U("Hi"), A("Yes. No. Maybe. Thanks! Yes. No. Maybe.")]}]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    data = prep(tmp_path, tok, tok_dir, path, "sft", max_length=30, truncation="drop")
    assert data.stats["examples"] == 1 and data.stats["dropped_for_length"] == 1
    assert data.stats["truncated"] == 0  # no kept row was truncated


def test_spec_checks():
    with pytest.raises(JaxalignError, match="data kind"):
        DataSpec("rlhf")
    with pytest.raises(JaxalignError, match="truncation"):
        DataSpec("sft", truncation="left")
    with pytest.raises(JaxalignError, match="max_prompt_length"):
        DataSpec("preference", max_length=16, max_prompt_length=16)


def test_on_error_skip_counts_bad_records(tmp_path, tok, tok_dir):
    good = sft_records(2)
    path = write_jsonl(tmp_path / "a.jsonl", [
        good[0], '{"messages": [', {"messages": [U("Hi"), A(" ")]}, {"messages": [{"role": "robot", "content": "x"},
                                                                                  A("Yes.")]},
        {"messages": [U("Hi"), {"role": "assistant", "content": 3}]}, good[1]])
    with pytest.raises(JaxalignError, match=r"a\.jsonl:2: invalid JSON"):
        prep(tmp_path, tok, tok_dir, path, "sft")
    logs = []
    data = prep(tmp_path, tok, tok_dir, path, "sft", on_error="skip", log=logs.append)
    assert data.stats == {"records": 6, "bad_records_skipped": 4, "truncated": 0, "dropped_for_length": 0,
                          "examples": 2}
    assert list(data.dataset["where"]) == [f"{path}:1", f"{path}:6"]
    assert data.dataset["input_ids"] == [r[0] for r in sft_expected(tok, good)]
    assert any(f"{path}:3: field 'messages[1].content'" in m for m in logs)
    assert any("4 bad records skipped" in m for m in logs)


@pytest.mark.parametrize("kind,good,bads", [
    ("preference", {"prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "margin": 1},
     [{"prompt": "Hi", "chosen": "Yes."}, {"prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "margin": "x"},
      {"prompt": "Hi", "chosen": "Yes.", "rejected": [{"role": "assistant", "content": None}]}]),
    ("unpaired", {"prompt": "Hi", "completion": "Yes.", "label": False},
     [{"prompt": "Hi", "completion": "Yes.", "label": 0}, {"prompt": "Hi", "label": True},
      {"prompt": [{"role": "robot", "content": "Hi"}], "completion": "Yes.", "label": True}]),
    ("prompt", {"prompt": "Hi", "id": 1}, [{"id": 2}, {"messages": [{"role": "user", "content": ""}]}, "[1, 2"]),
])
def test_on_error_skip_other_kinds(tmp_path, tok, tok_dir, kind, good, bads):
    path = write_jsonl(tmp_path / "a.jsonl", [good] + bads + [good])
    with pytest.raises(JaxalignError, match=rf"a\.jsonl:2: "):
        prep(tmp_path, tok, tok_dir, path, kind)
    data = prep(tmp_path, tok, tok_dir, path, kind, on_error="skip")
    assert data.stats["bad_records_skipped"] == len(bads) and data.stats["examples"] == 2
    assert data.stats["records"] == len(bads) + 2
    assert list(data.dataset["where"]) == [f"{path}:1", f"{path}:{len(bads) + 2}"]


def test_mixed_file_types_in_one_spec(tmp_path, tok, tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    records = sft_records(4)
    pq.write_table(pa.Table.from_pylist(records[:2]), str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(records[2:]).save_to_disk(str(tmp_path / "saved"))
    with open(tmp_path / "c.json", "w") as f:
        json.dump(records[:1], f)
    data = prep(tmp_path, tok, tok_dir, f"{tmp_path}/a.parquet,{tmp_path}/saved:2,{tmp_path}/c.json", "sft",
                max_length=64)
    assert data.dataset["input_ids"] == [r[0] for r in sft_expected(tok, records + records[:1])]
    assert list(data.dataset["file_id"]) == [0, 0, 1, 1, 2]
    assert list(data.dataset["where"]) == [f"{tmp_path}/a.parquet:row 0", f"{tmp_path}/a.parquet:row 1",
                                           f"{tmp_path}/saved:row 0", f"{tmp_path}/saved:row 1",
                                           f"{tmp_path}/c.json:row 0"]
    epoch = list(Batches(data, 1, epochs=1, seed=0))
    assert len(epoch) == 2 + 2 * 2 + 1


# --------------------------------------------------------------------------------------------- buckets

def test_bucket_choice(tmp_path, tok, tok_dir):
    records = [{"messages": [U("Hi"), A("Yes.")]},                                     # 16 < n <= 32
               {"messages": [U("Hi"), A("Yes. No. Maybe. Thanks! Yes. No. Maybe.")]}]   # 32 < n <= 64
    rows = sft_expected(tok, records)
    assert 16 < len(rows[0][0]) <= 32 < len(rows[1][0]) <= 64
    data = prep(tmp_path, tok, tok_dir, write_jsonl(tmp_path / "a.jsonl", records), "sft", max_length=64)
    one = list(Batches(data, 1, shuffle=False, epochs=1, buckets=(16, 32, 64)))
    assert [b["input_ids"].shape for b in one] == [(1, 32), (1, 64)]
    two = next(Batches(data, 2, shuffle=False, epochs=1, buckets=(64, 16, 32)))
    assert two["input_ids"].shape == (2, 64)
    np.testing.assert_array_equal(two["input_ids"], right_pad([r[0] for r in rows], 64, PAD))
    # the default: max_length and up to three halvings of at least 32, rounded to multiples of 8
    assert pipeline.default_buckets(64) == (32, 64)
    assert pipeline.default_buckets(1000) == (128, 256, 504, 1000)
    assert next(Batches(data, 1, shuffle=False))["input_ids"].shape == (1, 32)
    with pytest.raises(JaxalignError, match="largest bucket"):
        Batches(data, 1, buckets=(16, 32))


# --------------------------------------------------------------------------------------------- packing

def next_fit(lengths, L):
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if row and used + n > L:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    return rows + [row] if row else rows


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tok, tok_dir):
    tmp = tmp_path_factory.mktemp("packed")
    records = sft_records(7)
    L = 64
    data = prep(tmp, tok, tok_dir, write_jsonl(tmp / "a.jsonl", records), "sft", max_length=L)
    return data, sft_expected(tok, records), L


def test_packing_exact(packed):
    data, rows, L = packed
    groups = next_fit([len(r[0]) for r in rows], L)
    assert 1 < len(groups) < len(rows) and any(len(g) > 1 for g in groups)
    batches = list(Batches(data, 2, shuffle=False, packing=True, epochs=1, drop_last=False))
    got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n = len(groups)
    assert got["input_ids"].shape == (2 * len(batches), L)   # every packed row has exactly max_length slots
    ids, mask, seg, pos = [], [], [], []
    for g in groups:
        ids.append(sum((rows[i][0] for i in g), []))
        mask.append(sum((rows[i][1] for i in g), []))
        seg.append(sum(([s + 1] * len(rows[i][0]) for s, i in enumerate(g)), []))
        pos.append(sum((list(range(len(rows[i][0]))) for i in g), []))
        assert len(ids[-1]) <= L
    pad_rows = 2 * len(batches) - n
    ids, mask, seg, pos = (x + [[]] * pad_rows for x in (ids, mask, seg, pos))
    np.testing.assert_array_equal(got["input_ids"], right_pad(ids, L, PAD))
    np.testing.assert_array_equal(got["completion_mask"], right_pad(mask, L))
    np.testing.assert_array_equal(got["segment_ids"], right_pad(seg, L))
    np.testing.assert_array_equal(got["positions"], right_pad(pos, L))
    np.testing.assert_array_equal(got["attention_mask"], right_pad([[1] * len(s) for s in ids], L))
    np.testing.assert_array_equal(got["weight"], [1] * n + [0] * pad_rows)
    with pytest.raises(JaxalignError, match="SFT data only"):
        Batches(pipeline.Prepared(data.dataset, data.files, DataSpec("preference"), {}, 0), 2, packing=True)


def test_packed_row_equals_segments_alone_in_a_model(packed, tok):
    from jaxalign import loading
    from jaxalign.models.presets import get_preset

    data, rows, L = packed
    b = next(Batches(data, 1, shuffle=False, packing=True))
    segs = b["segment_ids"][0]
    k = int(segs.max())
    assert k >= 2
    lm = loading.from_config(get_preset("tiny", vocab_size=len(tok)))
    packed_logits = np.asarray(lm(b["input_ids"], b["attention_mask"], positions=b["positions"],
                                  segment_ids=b["segment_ids"]))
    alone = [b["input_ids"][0][segs == s] for s in range(1, k + 1)]
    alone_logits = np.asarray(lm(right_pad(alone, L, PAD), right_pad([[1] * len(a) for a in alone], L)))
    assert np.abs(packed_logits).max() > 0
    for s, a in enumerate(alone):
        np.testing.assert_allclose(packed_logits[0][segs == s + 1], alone_logits[s, :len(a)], atol=1e-5, rtol=0)
    # control: one segment id for the whole row lets later segments attend to earlier ones, and it shows
    merged = np.asarray(lm(b["input_ids"], b["attention_mask"], positions=b["positions"],
                           segment_ids=b["attention_mask"]))
    assert np.abs(merged[0][segs == 2] - alone_logits[1, :len(alone[1])]).max() > 1e-3


# --------------------------------------------------------------------------------- preference / KTO / prompts

def test_preference_batches_and_stack_pairs(tmp_path, tok, tok_dir):
    records = [{"prompt": f"Hi {i}", "chosen": "Yes." * (i + 1), "rejected": "No.", "margin": float(i)}
               for i in range(3)] + [{"prompt": "Hi", "chosen": "Yes.", "rejected": "No. Maybe."}]
    data = prep(tmp_path, tok, tok_dir, write_jsonl(tmp_path / "p.jsonl", records), "preference", max_length=64)
    b = next(Batches(data, 4, shuffle=False, buckets=(32, 64)))
    exp = {}
    for name in ("chosen", "rejected"):
        seqs = [chatml_prompt(tok, r["prompt"]) + chatml_reply(tok, r[name]) for r in records]
        masks = [[0] * len(chatml_prompt(tok, r["prompt"])) + [1] * len(chatml_reply(tok, r[name])) for r in records]
        T = 32 if max(map(len, seqs)) <= 32 else 64
        exp[f"{name}_input_ids"] = right_pad(seqs, T, PAD)
        exp[f"{name}_attention_mask"] = right_pad([[1] * len(s) for s in seqs], T)
        exp[f"{name}_completion_mask"] = right_pad(masks, T)
    assert exp["chosen_input_ids"].shape == exp["rejected_input_ids"].shape
    for k, v in exp.items():
        np.testing.assert_array_equal(b[k], v, err_msg=k)
    np.testing.assert_array_equal(b["margin"], np.array([0, 1, 2, 0], np.float32))
    stacked = pipeline.stack_pairs(b)
    assert set(stacked) == {"input_ids", "attention_mask", "completion_mask"}
    for k in stacked:
        np.testing.assert_array_equal(stacked[k], np.concatenate([exp[f"chosen_{k}"], exp[f"rejected_{k}"]]))
    import jax.numpy as jnp
    stacked_jax = pipeline.stack_pairs({k: jnp.asarray(v) for k, v in b.items()})
    np.testing.assert_array_equal(np.asarray(stacked_jax["input_ids"]), stacked["input_ids"])


def test_unpaired_batches_label_and_kl(tmp_path, tok, tok_dir):
    from jaxalign.train.preference import kto_kl_rows

    records = [{"prompt": f"Hi {i}", "completion": ["Yes.", "No.", "Maybe.", "Thanks!"][i], "label": i % 2 == 0}
               for i in range(4)]
    data = prep(tmp_path, tok, tok_dir, write_jsonl(tmp_path / "u.jsonl", records), "unpaired", max_length=64)
    b = next(Batches(data, 4, shuffle=False, buckets=(32, 64)))
    prompts = [chatml_prompt(tok, r["prompt"]) for r in records]
    comps = [chatml_reply(tok, r["completion"]) for r in records]
    # The data layer builds no KL rows (task logic: train/preference.py); it hands over the global batch's rows.
    assert not any(k.startswith("kl_") for k in b)
    assert isinstance(b["batch_rows"], kinds.BatchRows)
    assert (b["batch_rows"].prompt_ids, b["batch_rows"].completion_ids) == (prompts, comps)
    k = kto_kl_rows(b, 64)
    assert "batch_rows" not in k and not any(key.startswith("kl_") for key in b)  # a new dict; b is left alone
    kl = [comps[(i + 1) % 4] for i in range(4)]  # KL point: prompt i with the completion of the next row
    for prefix, cs in (("", comps), ("kl_", kl)):
        np.testing.assert_array_equal(k[f"{prefix}input_ids"], right_pad([p + c for p, c in zip(prompts, cs)], 32))
        np.testing.assert_array_equal(k[f"{prefix}completion_mask"],
                                      right_pad([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, cs)], 32))
        np.testing.assert_array_equal(k[f"{prefix}attention_mask"],
                                      right_pad([[1] * (len(p) + len(c)) for p, c in zip(prompts, cs)], 32))
        assert k[f"{prefix}input_ids"].dtype == np.int32
    np.testing.assert_array_equal(k["label"], [True, False, True, False])
    assert k["label"].dtype == bool


def test_kto_kl_rows_widen_cut_wrap_and_split(tmp_path, tok, tok_dir):
    """KL rows longer than the batch's own rows widen both to their bucket; a KL row is cut to max_length;
    in an eval pass's last batch the real rows wrap among themselves and the fill rows stay empty; and two
    processes' KL rows are the halves of one process's."""
    from jaxalign.train.preference import kto_kl_rows

    L, buckets = 56, (32, 48, 56)
    long_q, long_a = "What is two plus two? Name a color.", "The quick brown fox The quick brown fox"
    records = [{"prompt": long_q, "completion": "Yes.", "label": True},
               {"prompt": "Hi", "completion": long_a, "label": False},
               {"prompt": long_q, "completion": "No.", "label": True},
               {"prompt": "Hi 2", "completion": "Maybe.", "label": False},
               {"prompt": "Hi 3", "completion": "Thanks!", "label": True}]
    data = prep(tmp_path, tok, tok_dir, write_jsonl(tmp_path / "u.jsonl", records), "unpaired", max_length=L)
    prompts = [chatml_prompt(tok, r["prompt"]) for r in records]
    comps = [chatml_reply(tok, r["completion"]) for r in records]
    own = [len(p) + len(c) for p, c in zip(prompts, comps)]
    assert max(own) <= 48 and len(prompts[0]) + len(comps[1]) > L, own
    kw = dict(shuffle=False, epochs=1, drop_last=False, buckets=buckets)
    batches = [kto_kl_rows(b, L) for b in Batches(data, 4, **kw)]
    assert len(batches) == 2
    for b, rows in zip(batches, ([0, 1, 2, 3], [4])):
        kl = {i: comps[rows[(n + 1) % len(rows)]][:L - len(prompts[i])] for n, i in enumerate(rows)}
        longest = max([own[i] for i in rows] + [len(prompts[i]) + len(kl[i]) for i in rows])
        T = min(x for x in buckets if x >= longest)
        fill = [[]] * (4 - len(rows))
        for prefix, cs in (("", {i: comps[i] for i in rows}), ("kl_", kl)):
            np.testing.assert_array_equal(b[f"{prefix}input_ids"],
                                          right_pad([prompts[i] + cs[i] for i in rows] + fill, T, PAD))
            np.testing.assert_array_equal(b[f"{prefix}attention_mask"],
                                          right_pad([[1] * (len(prompts[i]) + len(cs[i])) for i in rows] + fill, T))
            np.testing.assert_array_equal(b[f"{prefix}completion_mask"], right_pad(
                [[0] * len(prompts[i]) + [1] * len(cs[i]) for i in rows] + fill, T))
        np.testing.assert_array_equal(b["weight"], [1] * len(rows) + [0] * len(fill))
    assert batches[0]["input_ids"].shape == (4, L)  # widened from 48 by prompt 0 + completion 1, cut to L
    assert batches[0]["kl_attention_mask"][0].sum() == L
    assert batches[1]["input_ids"].shape == (4, 32)  # row 4 alone: its own completion
    halves = [[kto_kl_rows(b, L) for b in Batches(data, 4, process_index=r, process_count=2, **kw)] for r in (0, 1)]
    for w, h0, h1 in zip(batches, *halves):
        assert set(w) == set(h0) == set(h1)
        for key in w:
            np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), w[key], err_msg=key)


def test_kinds_registry_and_empty_rows(tmp_path, tok):
    """One class per record kind, by the names configs and caches use; a failed example's row has exactly
    the columns of a rendered one."""
    assert tuple(kinds.KINDS) == formats.KINDS
    renderer = templates.Renderer(tok)
    examples = {"sft": {"messages": [U("Hi"), A("Yes.")]},
                "preference": {"prompt": [U("Hi")], "chosen": [A("Yes.")], "rejected": [A("No.")], "margin": None},
                "unpaired": {"prompt": [U("Hi")], "completion": [A("Yes.")], "label": True},
                "prompt": {"prompt": [U("Hi")], "extra": "{}"}}
    for name, kind in kinds.KINDS.items():
        assert kind.name == name and kind.packs == (name == "sft")
        row = kind.tokenize(renderer, {**examples[name], "where": "x:1"}, DataSpec(name, max_length=64))
        assert set(row) - {"truncated", "dropped", "length"} == set(kind.empty_row()), name
        assert kind.empty_row() is not kind.empty_row()


def test_prompt_batches_left_padded_with_extra(tmp_path, tok, tok_dir):
    records = [{"prompt": "Hi", "answer": "4"}, {"prompt": "What is two plus two?", "answer": "Four", "n": 2},
               {"messages": [U("Hi 2"), A("Yes.")], "tags": ["a"]}]
    data = prep(tmp_path, tok, tok_dir, write_jsonl(tmp_path / "q.jsonl", records), "prompt", max_length=64)
    b = list(Batches(data, 2, shuffle=False, epochs=1, drop_last=False, buckets=(16, 32, 64)))
    seqs = [chatml_prompt(tok, "Hi"), chatml_prompt(tok, "What is two plus two?"), chatml_prompt(tok, "Hi 2")]
    for batch, rows in zip(b, (seqs[:2], seqs[2:] + [[]])):
        T = min(x for x in (16, 32, 64) if x >= max(map(len, rows)))
        exp, att = np.full((2, T), PAD, np.int32), np.zeros((2, T), np.int32)
        for r, s in enumerate(rows):
            exp[r, T - len(s):], att[r, T - len(s):] = s, 1
        np.testing.assert_array_equal(batch["input_ids"], exp)
        np.testing.assert_array_equal(batch["attention_mask"], att)
    assert b[0]["extra"] == [{"answer": "4"}, {"answer": "Four", "n": 2}]
    assert b[1]["extra"] == [{"tags": ["a"]}, {}]
    np.testing.assert_array_equal(b[1]["weight"], [1, 0])


# -------------------------------------------------------------------------------------------- iterator

@pytest.fixture(scope="module")
def sft16(tmp_path_factory, tok, tok_dir):
    tmp = tmp_path_factory.mktemp("sft16")
    records = sft_records(16)
    return prep(tmp, tok, tok_dir, write_jsonl(tmp / "a.jsonl", records), "sft", max_length=64), records


def test_seeded_shuffle_and_epochs(sft16, tok):
    data, records = sft16
    keys = {tuple(ids): i for i, (ids, _) in enumerate(sft_expected(tok, records))}

    def order(batches):
        return [keys[k] for b in batches for k in row_keys(b)]

    a = take(Batches(data, 4, seed=0), 8)
    assert_batches_equal(a, take(Batches(data, 4, seed=0), 8))
    e0, e1 = order(a[:4]), order(a[4:])
    assert sorted(e0) == sorted(e1) == list(range(16))      # every epoch sees every example once
    assert e0 != e1 and e0 != list(range(16))               # reshuffled each epoch
    assert order(take(Batches(data, 4, seed=1), 4)) != e0   # a different seed, a different order
    assert order(take(Batches(data, 4, shuffle=False), 4)) == list(range(16))
    it = Batches(data, 4, seed=0)
    take(it, 4)
    assert it.state() == {"epoch": 0, "position": 4}
    next(it)
    assert it.state() == {"epoch": 1, "position": 1}
    assert len(list(Batches(data, 5, seed=0, epochs=2))) == 6  # drop_last: 3 batches per epoch
    with pytest.raises(JaxalignError, match="batch size"):
        next(Batches(data, 32))


def test_state_restore_across_epoch_boundary(sft16):
    data, _ = sft16
    for packing in (False, True):
        ref = Batches(data, 3, seed=7, packing=packing)
        nb = ref.batches_per_epoch(0)
        take(ref, nb - 1)
        state = ref.state()
        expected = take(ref, 4)   # crosses into epoch 1
        fresh = Batches(data, 3, seed=7, packing=packing)
        fresh.restore(json.loads(json.dumps(state)))
        assert_batches_equal(take(fresh, 4), expected)
        assert fresh.state() == ref.state() and ref.state()["epoch"] == 1


def test_two_processes_get_disjoint_halves(tmp_path, sft16, tok, tok_dir):
    data, _ = sft16
    pref = prep(tmp_path, tok, tok_dir, write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"Hi {i}", "chosen": "Yes." * (1 + i % 3), "rejected": "No.", "margin": i} for i in range(6)]),
        "preference", max_length=64)
    kto = prep(tmp_path, tok, tok_dir, write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": f"Hi {i}", "completion": "Yes." * (1 + i % 3), "label": i % 3 == 0} for i in range(6)]),
        "unpaired", max_length=64)
    prompts = prep(tmp_path, tok, tok_dir, write_jsonl(tmp_path / "q.jsonl", [
        {"prompt": f"Hi {i}", "id": i} for i in range(6)]), "prompt", max_length=64)
    train = {"seed": 3, "epochs": 2}
    cases = [(data, train), (data, dict(train, packing=True)), (pref, train), (kto, train), (prompts, train),
             (data, {"epochs": 1, "shuffle": False, "drop_last": False}),
             (kto, {"epochs": 1, "shuffle": False, "drop_last": False})]
    from jaxalign.train.preference import kto_kl_rows

    def batches(d, **kw):  # unpaired: with KTO's KL rows, which span both processes' rows
        out = list(Batches(d, 4, **kw))
        return [kto_kl_rows(b, 64) for b in out] if d is kto else out

    for d, kw in cases:
        whole = batches(d, **kw)
        halves = [batches(d, process_index=r, process_count=2, **kw) for r in (0, 1)]
        assert len(halves[0]) == len(halves[1]) == len(whole) > 1
        for w, h0, h1 in zip(whole, *halves):
            for k in w:
                if isinstance(w[k], np.ndarray):
                    assert h0[k].shape[0] == h1[k].shape[0] == w[k].shape[0] // 2
                    np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), w[k], err_msg=k)
                else:
                    assert h0[k] + h1[k] == w[k]
    with pytest.raises(JaxalignError, match="not divisible"):
        Batches(data, 3, process_count=2)


def test_eval_pass_covers_every_example_once(tmp_path, tok, tok_dir):
    records = sft_records(10)
    data = prep(tmp_path, tok, tok_dir, write_jsonl(tmp_path / "a.jsonl", records), "sft", max_length=64)
    batches = list(Batches(data, 4, epochs=1, shuffle=False, drop_last=False))
    assert len(batches) == 3
    rows = sft_expected(tok, records)
    last = batches[2]
    np.testing.assert_array_equal(last["weight"], [1, 1, 0, 0])
    np.testing.assert_array_equal(np.concatenate([b["weight"] for b in batches]), [1] * 10 + [0, 0])
    np.testing.assert_array_equal(last["input_ids"], right_pad([rows[8][0], rows[9][0], [], []],
                                                               last["input_ids"].shape[1], PAD))
    np.testing.assert_array_equal(last["attention_mask"][2:], 0)
    np.testing.assert_array_equal(last["completion_mask"][2:], 0)
    for b, chunk in zip(batches[:2], (rows[0:4], rows[4:8])):
        np.testing.assert_array_equal(b["input_ids"], right_pad([r[0] for r in chunk], b["input_ids"].shape[1]))


def test_file_weights_per_epoch_counts(tmp_path, tok, tok_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": [U(f"Hi {i}"), A("Yes.")]} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [U(f"Hi {i}"), A("No.")]} for i in range(4)])
    data = prep(tmp_path, tok, tok_dir, f"{a}:2,{b}:0.5", "sft", max_length=64)
    assert data.files == [(a, 2.0), (b, 0.5)] and len(data) == 8
    keys = {tuple(sft_row(tok, f"Hi {i}", ans)[0]): (name, i) for name, ans in (("a", "Yes."), ("b", "No."))
            for i in range(4)}
    for epoch_batches in (list(Batches(data, 1, seed=0, epochs=1)),
                          list(Batches(data, 2, seed=0, shuffle=False, epochs=1))):
        counts = collections.Counter(keys[k] for bt in epoch_batches for k in row_keys(bt))
        assert {k: v for k, v in counts.items() if k[0] == "a"} == {("a", i): 2 for i in range(4)}
        b_seen = [k for k in counts if k[0] == "b"]
        assert len(b_seen) == 2 and all(counts[k] == 1 for k in b_seen)
        assert sum(counts.values()) == 10


def test_glob_files(tmp_path, tok, tok_dir):
    for n in ("x1", "x2"):
        write_jsonl(tmp_path / "d" / f"{n}.jsonl", sft_records(2))
    data = prep(tmp_path, tok, tok_dir, f"{tmp_path}/d/*.jsonl", "sft", max_length=64)
    assert [p for p, _ in data.files] == [f"{tmp_path}/d/x1.jsonl", f"{tmp_path}/d/x2.jsonl"]
    assert list(data.dataset["file_id"]) == [0, 0, 1, 1] and data.stats["examples"] == 4


# ----------------------------------------------------------------------------------------------- cache

def test_cache_hits_and_invalidation(tmp_path, tok, tok_dir):
    path = write_jsonl(tmp_path / "a.jsonl", sft_records(3))
    logs = []
    first = prep(tmp_path, tok, tok_dir, path, "sft", log=logs.append, max_length=64)
    assert not any("cached" in m for m in logs)
    logs.clear()
    again = prep(tmp_path, tok, tok_dir, path, "sft", log=logs.append, max_length=64)
    assert again.cache_path == first.cache_path and os.path.isdir(first.cache_path)
    assert any(m.startswith(f"data: cached {first.cache_path}") for m in logs)
    assert again.stats == first.stats and again.dataset["input_ids"] == first.dataset["input_ids"]
    assert os.path.dirname(first.cache_path) == str(tmp_path / "cache")

    paths = {first.cache_path}

    def new(p):
        assert p.cache_path not in paths
        paths.add(p.cache_path)

    new(prep(tmp_path, tok, tok_dir, path, "sft", max_length=48))                      # max_length
    new(prep(tmp_path, tok, tok_dir, path, "sft", max_length=64, on_error="skip"))     # any data setting
    raw = templates.load_tokenizer(tok_dir, "raw")
    new(prep(tmp_path, raw, tok_dir, path, "sft", max_length=64))                      # chat template
    other = make_tokenizer(str(tmp_path / "tok2"), eos="<|im_end|>")
    new(prep(tmp_path, templates.load_tokenizer(other), other, path, "sft", max_length=64))  # tokenizer files
    with open(path, "a") as f:                                                         # data content
        f.write(json.dumps({"messages": [U("Hi"), A("Yes.")]}) + "\n")
    changed = prep(tmp_path, tok, tok_dir, path, "sft", max_length=64)
    new(changed)
    assert len(changed) == 4


def test_prepare_shows_no_datasets_progress_bars(tmp_path, tok, tok_dir, capfd):
    """Tokenising, filtering, saving and loading the cache print no "Map"/"Filter"/"Saving the dataset" bars;
    the global switch is put back, so a caller's own `datasets` use keeps its bars."""
    import datasets
    before = datasets.are_progress_bars_disabled()
    path = write_jsonl(tmp_path / "a.jsonl", sft_records(3))
    for _ in range(2):  # fresh, then from the cache
        prep(tmp_path, tok, tok_dir, path, "sft", max_length=64)
        out, err = capfd.readouterr()
        assert out + err == "", out + err
    assert datasets.are_progress_bars_disabled() == before


# ------------------------------------------------------------------------------------------ sentencepiece

def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=100, model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    # a Llama-2 style directory: tokenizer.model + tokenizer_config.json (converted on load)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (raw / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                           "eos_token": "</s>", "unk_token": "<unk>"}))
    # and the same saved by transformers
    saved = str(tmp_path / "saved")
    LlamaTokenizer.from_pretrained(str(raw)).save_pretrained(saved)
    records = [{"messages": [U("Hello there"), A("Yes.")]}, {"messages": [U("Name a color."), A("Blue.")]}]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    for d in (str(raw), saved):
        tok = templates.load_tokenizer(d)
        assert tok.chat_template == templates.CHATML
        assert tok("The quick brown fox", add_special_tokens=False)["input_ids"] == sp.encode("The quick brown fox")
        assert tok.eos_token_id == 2
        data = pipeline.prepare(path, DataSpec("sft", max_length=128), tok, d, cache_dir=str(tmp_path / "cache"),
                                log=lambda m: None)
        assert data.pad_id == 2  # no pad token: EOS pads
        b = next(Batches(data, 2, shuffle=False, buckets=(32, 64, 128)))
        rows = []
        for r in records:
            q, a = r["messages"][0]["content"], r["messages"][1]["content"]
            p = enc(tok, f"<|im_start|>user\n{q}<|im_end|>\n") + enc(tok, "<|im_start|>assistant\n")
            c = enc(tok, f"{a}<|im_end|>\n") + [2]
            rows.append((p + c, [0] * len(p) + [1] * len(c)))
        T = b["input_ids"].shape[1]
        assert T == min(x for x in (32, 64, 128) if x >= max(len(r[0]) for r in rows))
        np.testing.assert_array_equal(b["input_ids"], right_pad([r[0] for r in rows], T, 2))
        np.testing.assert_array_equal(b["completion_mask"], right_pad([r[1] for r in rows], T))
        assert "Yes." in tok.decode(b["input_ids"][0][b["completion_mask"][0].astype(bool)])


# ------------------------------------------------------------------------------------------ config + CLI

RECIPE = """
import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.tokenizer = dict(path={tok!r})
    c.data = dict(train_files={train!r}, max_length=64{extra})
    return c
"""


def write_recipe(path, tok_dir, train, extra=""):
    path.write_text(RECIPE.format(tok=tok_dir, train=train, extra=extra))
    return str(path)


def test_load_config_and_overrides(tmp_path, tok_dir):
    from jaxalign.config import load_config
    train = write_jsonl(tmp_path / "a.jsonl", sft_records(3))
    recipe = write_recipe(tmp_path / "cfg.py", tok_dir, train, extra=", on_error='skip'")
    cfg = load_config(recipe)
    assert cfg.task == "sft" and cfg.data.train_files == train and cfg.data.max_length == 64
    assert cfg.data.on_error == "skip" and cfg.data.truncation == "truncate" and cfg.train.batch_size == 8
    assert cfg.tokenizer.path == tok_dir and cfg.tokenizer.chat_template == ""
    cfg = load_config(recipe, ["data.max_length=32", "data.packing=true", "data.max_prompt_length=8",
                               "data.train_files=x.jsonl:2,y.jsonl"])
    assert (cfg.data.max_length, cfg.data.packing, cfg.data.max_prompt_length) == (32, True, 8)
    assert cfg.data.train_files == "x.jsonl:2,y.jsonl"
    with pytest.raises(JaxalignError, match=r"unknown config field 'data\.max_len'"):
        load_config(recipe, ["data.max_len=32"])
    with pytest.raises(JaxalignError, match=r"unknown config field 'data\.max_len'"):
        load_config(write_recipe(tmp_path / "bad.py", tok_dir, train, extra=", max_len=3"))
    with pytest.raises(JaxalignError, match=r"data\.packing"):
        load_config(recipe, ["data.packing=maybe"])
    with pytest.raises(JaxalignError, match=r"data\.max_length"):
        load_config(recipe, ["data.max_length=abc"])
    with pytest.raises(JaxalignError, match="config file not found"):
        load_config(str(tmp_path / "missing.py"))


def test_prepare_from_config(tmp_path, tok, tok_dir):
    from jaxalign.config import load_config
    train = write_jsonl(tmp_path / "a.jsonl", sft_records(3))
    ev = write_jsonl(tmp_path / "e.jsonl", sft_records(2))
    cfg = load_config(write_recipe(tmp_path / "cfg.py", tok_dir, train),
                      [f"data.eval_files={ev}", f"data.cache_dir={tmp_path / 'c'}", "data.max_length=48"])
    data = pipeline.prepare_from_config(cfg, "train", log=lambda m: None, kind="sft")
    assert data.spec == DataSpec("sft", max_length=48) and len(data) == 3
    assert data.dataset["input_ids"] == [r[0] for r in sft_expected(tok, sft_records(3))]
    assert os.path.dirname(data.cache_path) == str(tmp_path / "c")
    assert len(pipeline.prepare_from_config(cfg, "eval", log=lambda m: None, kind="sft")) == 2
    cfg.data.eval_files = ""
    assert pipeline.prepare_from_config(cfg, "eval", kind="sft") is None


def test_cli_prepare(tmp_path, tok, tok_dir):
    train = write_jsonl(tmp_path / "a.jsonl", sft_records(3))
    bad = write_jsonl(tmp_path / "bad.jsonl", [sft_records(1)[0], {"messages": [U("Hi"), A("")]}])
    recipe = write_recipe(tmp_path / "cfg.py", tok_dir, train)
    cache = tmp_path / "cli-cache"
    env = dict(os.environ, JAXALIGN_DATA_CACHE=str(cache), PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "jaxalign.cli", "prepare", "--config", recipe, "--config.data.max_length=48"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert first.returncode == 0, first.stderr
    lines = [ln for ln in first.stdout.splitlines() if ln.startswith("train: ")]
    assert len(lines) == 1 and lines[0].startswith("train: 3 examples cached at ")
    path = lines[0].rsplit(" ", 1)[1]
    assert os.path.dirname(path) == str(cache) and os.path.isdir(path)
    assert "cached" not in first.stdout.replace("examples cached at", "")
    # the override reached the cache key: the same data at max_length=48 (not the recipe's 64)
    same = pipeline.prepare(train, DataSpec("sft", max_length=48), tok, tok_dir, cache_dir=str(cache),
                            log=lambda m: None)
    assert same.cache_path == path

    # second run: a cache hit for train; then the bad eval file stops it with one line and exit status 2
    second = subprocess.run(cmd + [f"--config.data.eval_files={bad}"], env=env, capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=120)
    assert f"data: cached {path}" in second.stdout
    assert f"train: 3 examples cached at {path}" in second.stdout
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [f"jaxalign: error: {bad}:2: field 'messages[1].content': is empty"]
