"""Record formats (docs/DESIGN.md §5): every accepted record shape, every file type, file weights and globs, and
errors that name the file, the line or row and the field."""
import json
import os

import pytest

from jaxalign import JaxalignError
from jaxalign.data import formats
from jaxalign.data.formats import DataError, load_examples, parse_files
from tests.tokenizers_util import write_jsonl


def load(path, kind, **kw):
    examples, file_ids, skipped = load_examples([(str(path), 1.0)], kind, **kw)
    return examples, file_ids, skipped


def strip(examples):
    return [{k: v for k, v in ex.items() if k != "where"} for ex in examples]


U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731


# ------------------------------------------------------------------------------------------- records

def test_conversation_role_from_and_sharegpt_value(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Yes."}]},
        # ColossalChat: `from` with human/assistant/system and `content`
        {"messages": [{"from": "system", "content": "Be brief."}, {"from": "human", "content": "Hi"},
                      {"from": "assistant", "content": "No."}, {"from": "human", "content": "Why?"},
                      {"from": "assistant", "content": "Maybe."}]},
        # ShareGPT: `conversations` with from/value
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Thanks!"}]},
    ])
    examples, file_ids, skipped = load(path, "sft")
    assert skipped == 0 and file_ids == [0, 0, 0]
    assert strip(examples) == [
        {"messages": [S(""), U("Hi"), A("Yes.")]},
        {"messages": [S("Be brief."), U("Hi"), A("No."), U("Why?"), A("Maybe.")]},
        {"messages": [U("Hi"), A("Thanks!")]},
    ]
    assert [ex["where"] for ex in examples] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_alpaca_input_optional(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Sort the list.", "input": "3 1 2", "output": "1 2 3"},
        {"instruction": "Name a color.", "output": "Blue."},
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
    ])
    examples, _, _ = load(path, "sft")
    assert strip(examples) == [
        {"messages": [U("Sort the list.\n\n3 1 2"), A("1 2 3")]},
        {"messages": [U("Name a color."), A("Blue.")]},
        {"messages": [U("Name a color."), A("Blue.")]},
    ]


def test_preference_forms(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five.", "margin": 2},
        {"context": [U("Hi")], "chosen": [A("Yes.")], "rejected": [A("No.")], "margin": 0.5},
        {"prompt": [S("Be brief."), U("Hi")], "chosen": "Yes.", "rejected": [{"from": "gpt", "value": "No."}]},
        # implicit prompt (TRL): the shared leading messages are the prompt
        {"chosen": [U("Hi"), A("Yes."), U("Why?"), A("Maybe.")],
         "rejected": [U("Hi"), A("Yes."), U("Why?"), A("No.")]},
    ])
    examples, _, _ = load(path, "preference")
    assert strip(examples) == [
        {"prompt": [U("What is two plus two?")], "chosen": [A("Four.")], "rejected": [A("Five.")], "margin": 2.0},
        {"prompt": [U("Hi")], "chosen": [A("Yes.")], "rejected": [A("No.")], "margin": 0.5},
        {"prompt": [S("Be brief."), U("Hi")], "chosen": [A("Yes.")], "rejected": [A("No.")], "margin": None},
        {"prompt": [U("Hi"), A("Yes."), U("Why?")], "chosen": [A("Maybe.")], "rejected": [A("No.")],
         "margin": None},
    ]
    assert isinstance(examples[0]["margin"], float)


def test_unpaired_and_prompt_only(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": "Hi", "completion": "Yes.", "label": True},
        {"prompt": [U("Hi")], "completion": [A("No.")], "label": False},
    ])
    assert strip(load(path, "unpaired")[0]) == [
        {"prompt": [U("Hi")], "completion": [A("Yes.")], "label": True},
        {"prompt": [U("Hi")], "completion": [A("No.")], "label": False},
    ]
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"prompt": "What is two plus two?", "answer": "4", "meta": {"level": 1}},
        {"messages": [S("Be brief."), U("Hi")], "id": 7},
        {"messages": [U("Hi"), A("Yes.")]},  # a full conversation: the last reply is generated afresh
    ])
    examples = strip(load(path, "prompt")[0])
    assert [ex["prompt"] for ex in examples] == [[U("What is two plus two?")], [S("Be brief."), U("Hi")], [U("Hi")]]
    assert [json.loads(ex["extra"]) for ex in examples] == [{"answer": "4", "meta": {"level": 1}}, {"id": 7}, {}]


# --------------------------------------------------------------------------------------------- files

RECORDS = [
    {"messages": [U("Hi"), A("Yes.")]},
    {"messages": [S("Be brief."), U("Name a color."), A("Blue.")]},
    {"messages": [U("Hi"), A("No."), U("Why?"), A("Maybe.")]},
]


def _write_all_formats(tmp_path, records):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", records)}
    paths["json"] = str(tmp_path / "d.json")
    with open(paths["json"], "w") as f:
        json.dump(records, f)
    paths["json_data"] = str(tmp_path / "d2.json")
    with open(paths["json_data"], "w") as f:
        json.dump({"data": records}, f)
    paths["parquet"] = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
    paths["datasets"] = str(tmp_path / "saved")
    datasets.Dataset.from_list(records).save_to_disk(paths["datasets"])
    return paths


def test_all_file_types_give_the_same_examples(tmp_path):
    paths = _write_all_formats(tmp_path, RECORDS)
    expected = [{"messages": r["messages"]} for r in RECORDS]
    for name, path in paths.items():
        examples, _, _ = load(path, "sft")
        assert strip(examples) == expected, name
        if name == "jsonl":
            assert [ex["where"] for ex in examples] == [f"{path}:{n}" for n in (1, 2, 3)]
        else:
            assert [ex["where"] for ex in examples] == [f"{path}:row {n}" for n in (0, 1, 2)], name


def test_parquet_and_datasets_preference_with_optional_margin(tmp_path):
    records = [{"prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "margin": 1.5},
               {"prompt": "Hi", "chosen": "Maybe.", "rejected": "No.", "margin": None}]
    paths = _write_all_formats(tmp_path, records)
    for name in ("parquet", "datasets"):
        examples, _, _ = load(paths[name], "preference")
        assert [ex["margin"] for ex in examples] == [1.5, None], name
        assert [ex["chosen"] for ex in examples] == [[A("Yes.")], [A("Maybe.")]]


def test_unsupported_file_and_dataset_dict(tmp_path):
    import datasets
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file"):
        load(tmp_path / "d.csv", "sft")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict"):
        load(tmp_path / "dd", "sft")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load(tmp_path / "obj.json", "sft")


def test_parse_files_weights_globs_and_errors(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    b = write_jsonl(tmp_path / "b.jsonl", RECORDS)
    os.makedirs(tmp_path / "sub")
    c = write_jsonl(tmp_path / "sub" / "c.jsonl", RECORDS)
    assert parse_files(f"{a}:2,{b}:0.5") == [(a, 2.0), (b, 0.5)]
    assert parse_files(f" {a} , {b}:3 ") == [(a, 1.0), (b, 3.0)]
    assert parse_files([a, f"{b}:2"]) == [(a, 1.0), (b, 2.0)]
    assert parse_files(f"{tmp_path}/*.jsonl") == [(a, 1.0), (b, 1.0)]
    assert parse_files(f"{tmp_path}/*.jsonl:2,{tmp_path}/sub/*.jsonl") == [(a, 2.0), (b, 2.0), (c, 1.0)]
    assert parse_files("") == []
    with pytest.raises(JaxalignError, match="not found"):
        parse_files(f"{tmp_path}/nothing*.jsonl")
    with pytest.raises(JaxalignError, match="not found"):
        parse_files(f"{tmp_path}/missing.jsonl")
    with pytest.raises(JaxalignError, match="weight must be positive"):
        parse_files(f"{a}:0")


def test_load_examples_file_ids(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", RECORDS)
    examples, file_ids, _ = load_examples(parse_files(f"{a},{b}:2"), "sft")
    assert file_ids == [0, 0, 1, 1, 1]
    assert [ex["where"] for ex in examples] == [f"{a}:1", f"{a}:2", f"{b}:1", f"{b}:2", f"{b}:3"]


# -------------------------------------------------------------------------------------------- errors

GOOD = {
    "sft": {"messages": [U("Hi"), A("Yes.")]},
    "preference": {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."},
    "unpaired": {"prompt": "Hi", "completion": "Yes.", "label": True},
    "prompt": {"prompt": "Hi"},
}

# (kind, bad record, field, message) -> the error reads "FILE:3: field 'FIELD': MESSAGE"
BAD = [
    ("sft", {"messages": [U("Hi"), A("  ")]}, "messages[1].content", "is empty"),
    ("sft", {"messages": [U("Hi"), A("")]}, "messages[1].content", "is empty"),
    ("sft", {"messages": [{"role": "robot", "content": "Hi"}, A("Yes.")]}, "messages[0].role",
     "unknown role 'robot'"),
    ("sft", {"messages": [U("Hi"), {"role": "assistant", "content": 5}]}, "messages[1].content",
     "expected a string, got int"),
    ("sft", {"conversations": [{"from": "human", "value": ["Hi"]}, {"from": "gpt", "value": "Yes."}]},
     "conversations[0].value", "expected a string, got list"),
    ("sft", {"messages": [U("Hi"), {"role": "assistant"}]}, "messages[1].content", "is missing"),
    ("sft", {"messages": [U("Hi"), {"content": "Yes."}]}, "messages[1].role", "is missing"),
    ("sft", {"messages": []}, "messages", "expected a non-empty list of messages"),
    ("sft", {"messages": [U("Hi"), A("Yes."), U("Why?")]}, "messages[2].role",
     "a conversation must end with an assistant turn"),
    ("sft", {"text": "Hi"}, "messages|instruction", "is missing"),
    ("sft", {"instruction": "Hi"}, "output", "expected a string, got NoneType"),
    ("sft", {"instruction": "Hi", "output": ""}, "output", "is empty"),
    ("preference", {"prompt": "Hi", "chosen": "Yes."}, "rejected", "is missing"),
    ("preference", {"prompt": "Hi", "chosen": "", "rejected": "No."}, "chosen", "is empty"),
    ("preference", {"prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "margin": "high"}, "margin",
     "expected a number, got 'high'"),
    ("preference", {"prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "margin": True}, "margin",
     "expected a number, got True"),
    ("preference", {"prompt": "Hi", "chosen": [U("Yes.")], "rejected": "No."}, "chosen",
     "the completion must consist of assistant turns"),
    ("preference", {"chosen": [U("Hi"), A("Yes.")], "rejected": [U("Bye"), A("No.")]}, "prompt",
     "is missing"),
    ("preference", {"prompt": "Hi", "chosen": [A("Yes."), {"role": "assistant", "content": 3}],
                    "rejected": "No."}, "chosen[1].content", "expected a string, got int"),
    ("unpaired", {"prompt": "Hi", "completion": "Yes.", "label": 1}, "label", "expected true or false, got 1"),
    ("unpaired", {"prompt": "Hi", "completion": "Yes.", "label": "true"}, "label",
     "expected true or false, got 'true'"),
    ("unpaired", {"prompt": "Hi", "completion": "Yes."}, "label", "is missing"),
    ("unpaired", {"completion": "Yes.", "label": False}, "prompt", "is missing"),
    ("prompt", {"question": "Hi"}, "prompt|messages", "is missing"),
    ("prompt", {"prompt": 3}, "prompt", "expected a non-empty list of messages"),
    ("prompt", {"messages": [A("Yes.")]}, "messages", "a prompt must end with a user or system turn"),
]


@pytest.mark.parametrize("kind,bad,field,message", BAD, ids=[f"{k}-{f}-{m[:20]}" for k, _, f, m in BAD])
def test_bad_record_names_file_line_and_field(tmp_path, kind, bad, field, message):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD[kind], GOOD[kind], bad, GOOD[kind]])
    with pytest.raises(DataError) as e:
        load(path, kind)
    assert str(e.value).startswith(f"{path}:3: field '{field}': {message}"), str(e.value)
    assert "\n" not in str(e.value)
    logs = []
    examples, file_ids, skipped = load(path, kind, on_error="skip", log=logs.append)
    assert skipped == 1 and len(examples) == 3 and file_ids == [0, 0, 0]
    assert [ex["where"] for ex in examples] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert logs[0].startswith(f"skipping bad record: {path}:3: field '{field}'") and "skipped 1 bad" in logs[-1]


def test_malformed_json_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD["sft"], "", GOOD["sft"], '{"messages": [', GOOD["sft"]])
    with pytest.raises(DataError) as e:
        load(path, "sft")
    assert str(e.value).startswith(f"{path}:4: invalid JSON"), str(e.value)
    examples, _, skipped = load(path, "sft", on_error="skip", log=lambda m: None)
    assert skipped == 1 and [ex["where"] for ex in examples] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_errors_in_json_parquet_and_datasets_name_the_row(tmp_path):
    records = [GOOD["sft"], {"messages": [U("Hi"), {"role": "assistant", "content": ""}]}]
    paths = _write_all_formats(tmp_path, records)
    for name in ("json", "parquet", "datasets"):
        with pytest.raises(DataError) as e:
            load(paths[name], "sft")
        assert str(e.value).startswith(f"{paths[name]}:row 1: field 'messages[1].content': is empty"), name
    (tmp_path / "bad.json").write_text('[{"messages": []},\n  {oops}]')
    with pytest.raises(DataError, match=rf"^{tmp_path}/bad.json:2: invalid JSON"):
        load(tmp_path / "bad.json", "sft")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(DataError, match=rf"^{tmp_path}/list.json:row 0: expected a JSON object, got int"):
        load(tmp_path / "list.json", "sft")


def test_on_error_value_is_checked(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD["sft"]])
    with pytest.raises(JaxalignError, match="on_error"):
        load(path, "sft", on_error="ignore")
    with pytest.raises(ValueError, match="unknown data kind"):
        formats.normalize(formats.Record("x:1", GOOD["sft"]), "rlhf")
