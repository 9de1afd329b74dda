"""Chat-template rendering, end to end through prepare() and Batches: exact input ids, loss masks and padding.

Expectations are built independently of Renderer: the known template text of each piece is tokenised on its
own with the tokenizer (`tok(piece, add_special_tokens=False)`) and the ids concatenated.
"""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, processors

from jaxalign import JaxalignError
from jaxalign.data import pipeline, templates
from jaxalign.data.formats import DataError
from tests.tokenizers_util import make_tokenizer, write_jsonl

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

STORED = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}### assistant: {% endif %}")
CUSTOM = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    dirs = {"plain": make_tokenizer(str(root / "plain")),
            "im_end": make_tokenizer(str(root / "im_end"), eos="<|im_end|>"),
            "stored": make_tokenizer(str(root / "stored"), chat_template=STORED)}
    # Llama-2 style: the tokenizer itself puts BOS in front of every sequence.
    bos = make_tokenizer(str(root / "bos"))
    t = Tokenizer.from_file(f"{bos}/tokenizer.json")
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", 1)])
    t.save(f"{bos}/tokenizer.json")
    dirs["bos"] = bos
    return dirs


def prepare(tmp_path, tok_dir, kind, records, chat_template=None, **spec):
    tok = templates.load_tokenizer(tok_dir, chat_template)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / f"{kind}.jsonl", records)
    logs = []
    data = pipeline.prepare(path, pipeline.DataSpec(kind, **spec), tok, tok_dir,
                            cache_dir=str(tmp_path / "cache"), log=logs.append)
    return tok, data


def one_batch(data, batch_size, buckets=(16, 32, 64, 128)):
    b = pipeline.Batches(data, batch_size, shuffle=False, epochs=1, drop_last=False, buckets=buckets)
    return next(b)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expect(tok, pieces):
    """[(text or token id, mask bit)] -> (ids, mask)."""
    ids, mask = [], []
    for p, m in pieces:
        t = [p] if isinstance(p, int) else enc(tok, p)
        ids += t
        mask += [m] * len(t)
    return ids, mask


def bucket(n, buckets=(16, 32, 64, 128)):
    return min(b for b in buckets if b >= n)


def right_pad(rows, T, value):
    out = np.full((len(rows), T), value, np.int32)
    for r, s in enumerate(rows):
        out[r, :len(s)] = s
    return out


def check_sft(batch, rows, pad_id):
    """rows: [(ids, mask)] -> exact input_ids / attention_mask / completion_mask with right padding."""
    T = bucket(max(len(i) for i, _ in rows))
    assert batch["input_ids"].shape == (len(rows), T)
    np.testing.assert_array_equal(batch["input_ids"], right_pad([i for i, _ in rows], T, pad_id))
    np.testing.assert_array_equal(batch["attention_mask"], right_pad([[1] * len(i) for i, _ in rows], T, 0))
    np.testing.assert_array_equal(batch["completion_mask"], right_pad([m for _, m in rows], T, 0))


# ------------------------------------------------------------------------------------ template choice

def test_template_resolution(tok_dirs, tmp_path):
    assert templates.load_tokenizer(tok_dirs["plain"]).chat_template == templates.CHATML
    assert templates.load_tokenizer(tok_dirs["stored"]).chat_template == STORED
    assert templates.load_tokenizer(tok_dirs["stored"], "chatml").chat_template == templates.CHATML
    assert templates.load_tokenizer(tok_dirs["stored"], "raw").chat_template == templates.RAW
    assert templates.load_tokenizer(tok_dirs["plain"], CUSTOM).chat_template == CUSTOM
    (tmp_path / "t.jinja").write_text(CUSTOM)
    assert templates.load_tokenizer(tok_dirs["plain"], str(tmp_path / "t.jinja")).chat_template == CUSTOM
    with pytest.raises(JaxalignError, match="not found"):
        templates.load_tokenizer(tok_dirs["plain"], str(tmp_path / "missing.jinja"))
    with pytest.raises(JaxalignError, match="not a built-in"):
        templates.load_tokenizer(tok_dirs["plain"], "vicuna")
    with pytest.raises(JaxalignError, match="tokenizer directory not found"):
        templates.load_tokenizer(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------- SFT

def test_sft_chatml_single_and_multi_turn_exact(tok_dirs, tmp_path):
    tok, data = prepare(tmp_path, tok_dirs["plain"], "sft", [
        {"messages": [U("What is two plus two?"), A("Four.")]},
        {"messages": [S("Answer briefly."), U("Hi"), A("No."), U("Why?"), A("Maybe.")]},
        {"conversations": [{"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]},
    ], max_length=128)
    eos, pad = tok.convert_tokens_to_ids("</s>"), tok.convert_tokens_to_ids("<pad>")
    assert data.pad_id == pad == 0 and eos == 2
    single = expect(tok, [("<|im_start|>user\nWhat is two plus two?<|im_end|>\n", 0),
                          ("<|im_start|>assistant\n", 0), ("Four.<|im_end|>\n", 1), (eos, 1)])
    multi = expect(tok, [("<|im_start|>system\nAnswer briefly.<|im_end|>\n", 0),
                         ("<|im_start|>user\nHi<|im_end|>\n", 0), ("<|im_start|>assistant\n", 0),
                         ("No.<|im_end|>\n", 1),  # an earlier turn: masked, no EOS
                         ("<|im_start|>user\nWhy?<|im_end|>\n", 0), ("<|im_start|>assistant\n", 0),
                         ("Maybe.<|im_end|>\n", 1), (eos, 1)])
    batch = one_batch(data, 3)
    check_sft(batch, [single, multi, single], pad)
    np.testing.assert_array_equal(batch["weight"], [1, 1, 1])
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "weight", "index"}
    np.testing.assert_array_equal(np.sort(batch["index"]), [0, 1, 2])  # each row says which example it is
    # the same, read back as text: the loss covers the replies alone, through <|im_end|>\n and the final EOS
    ids, mask = batch["input_ids"][1], batch["completion_mask"][1].astype(bool)
    assert tok.decode(ids[mask]) == "No.<|im_end|>\nMaybe.<|im_end|>\n</s>"
    assert tok.decode(ids[batch["attention_mask"][1].astype(bool)]) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "No.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nMaybe.<|im_end|>\n</s>")
    assert (ids == eos).sum() == 1


def test_sft_eos_is_im_end_no_extra_eos(tok_dirs, tmp_path):
    tok, data = prepare(tmp_path, tok_dirs["im_end"], "sft", [
        {"messages": [U("Hi"), A("No."), U("Why?"), A("Maybe.")]}], max_length=64)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    row = expect(tok, [("<|im_start|>user\nHi<|im_end|>\n", 0), ("<|im_start|>assistant\n", 0),
                       ("No.<|im_end|>\n", 1), ("<|im_start|>user\nWhy?<|im_end|>\n", 0),
                       ("<|im_start|>assistant\n", 0), ("Maybe.<|im_end|>\n", 1)])
    check_sft(one_batch(data, 1), [row], 0)
    assert row[0][-2:] == [im_end, enc(tok, "\n")[0]]


def test_sft_raw_template(tok_dirs, tmp_path):
    tok, data = prepare(tmp_path, tok_dirs["plain"], "sft", [
        {"messages": [U("Name a color."), A(" Blue.")]},
        {"instruction": "Sort the list", "input": "3 1 2:", "output": " 1 2 3."}], chat_template="raw",
        max_length=64)
    rows = [expect(tok, [("Name a color.", 0), (" Blue.", 1), (2, 1)]),
            expect(tok, [("Sort the list\n\n3 1 2:", 0), (" 1 2 3.", 1), (2, 1)])]
    check_sft(one_batch(data, 2), rows, 0)


def test_sft_custom_template_string_and_stored_template(tok_dirs, tmp_path):
    records = [{"messages": [U("Hi"), A("Yes."), U("Why?"), A("Maybe.")]}]
    tok, data = prepare(tmp_path / "custom", tok_dirs["plain"], "sft", records, chat_template=CUSTOM, max_length=64)
    row = expect(tok, [("[user] Hi\n", 0), ("[assistant] ", 0), ("Yes.\n", 1), ("[user] Why?\n", 0),
                       ("[assistant] ", 0), ("Maybe.\n", 1), (2, 1)])
    check_sft(one_batch(data, 1), [row], 0)

    tok, data = prepare(tmp_path / "stored", tok_dirs["stored"], "sft", records, max_length=64)
    row = expect(tok, [("### user: Hi\n", 0), ("### assistant: ", 0), ("Yes.\n", 1), ("### user: Why?\n", 0),
                       ("### assistant: ", 0), ("Maybe.\n", 1), (2, 1)])
    check_sft(one_batch(data, 1), [row], 0)


def test_bos_added_once(tok_dirs, tmp_path):
    tok, data = prepare(tmp_path / "a", tok_dirs["bos"], "sft", [{"messages": [U("Hi"), A("Yes.")]}], max_length=64)
    assert tok("x")["input_ids"][0] == 1  # the tokenizer adds BOS itself
    row = expect(tok, [(1, 0), ("<|im_start|>user\nHi<|im_end|>\n", 0), ("<|im_start|>assistant\n", 0),
                       ("Yes.<|im_end|>\n", 1), (2, 1)])
    check_sft(one_batch(data, 1), [row], 0)
    # a template that writes BOS itself: still exactly one BOS
    tmpl = "{{ bos_token }}" + templates.RAW
    tok, data = prepare(tmp_path / "b", tok_dirs["bos"], "preference",
                        [{"prompt": "Hi", "chosen": " Yes.", "rejected": " No."}], chat_template=tmpl, max_length=64)
    b = one_batch(data, 1)
    prompt = [1] + enc(tok, "Hi")
    chosen = prompt + enc(tok, " Yes.") + [2]
    rejected = prompt + enc(tok, " No.") + [2]
    np.testing.assert_array_equal(b["chosen_input_ids"], right_pad([chosen], 16, 0))
    np.testing.assert_array_equal(b["rejected_input_ids"], right_pad([rejected], 16, 0))
    assert (b["chosen_input_ids"] == 1).sum() == 1


# ------------------------------------------------------------------------------------ preference

def test_preference_shared_prompt_and_completion_boundary(tok_dirs, tmp_path):
    tok, data = prepare(tmp_path, tok_dirs["plain"], "preference", [
        {"prompt": [S("Be brief."), U("What is two plus two?")], "chosen": "Four.", "rejected": "Five, maybe.",
         "margin": 1.5},
        {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."},
    ], max_length=64)
    prompt0 = enc(tok, "<|im_start|>system\nBe brief.<|im_end|>\n") + enc(
        tok, "<|im_start|>user\nWhat is two plus two?<|im_end|>\n") + enc(tok, "<|im_start|>assistant\n")
    prompt1 = enc(tok, "<|im_start|>user\nHi<|im_end|>\n") + enc(tok, "<|im_start|>assistant\n")
    rows = {"chosen": [(prompt0, enc(tok, "Four.<|im_end|>\n") + [2]), (prompt1, enc(tok, "Yes.<|im_end|>\n") + [2])],
            "rejected": [(prompt0, enc(tok, "Five, maybe.<|im_end|>\n") + [2]),
                         (prompt1, enc(tok, "No.<|im_end|>\n") + [2])]}
    T = bucket(max(len(p) + len(c) for v in rows.values() for p, c in v))
    b = one_batch(data, 2)
    for name, rs in rows.items():
        np.testing.assert_array_equal(b[f"{name}_input_ids"], right_pad([p + c for p, c in rs], T, 0))
        np.testing.assert_array_equal(b[f"{name}_attention_mask"], right_pad([[1] * len(p + c) for p, c in rs], T, 0))
        np.testing.assert_array_equal(b[f"{name}_completion_mask"],
                                      right_pad([[0] * len(p) + [1] * len(c) for p, c in rs], T, 0))
    np.testing.assert_array_equal(b["margin"], np.array([1.5, 0.0], np.float32))
    assert b["margin"].dtype == np.float32
    # chosen and rejected share the prompt ids exactly; masks start at the first completion token
    for r, p in enumerate((prompt0, prompt1)):
        n = len(p)
        np.testing.assert_array_equal(b["chosen_input_ids"][r, :n], b["rejected_input_ids"][r, :n])
        assert b["chosen_completion_mask"][r, :n].sum() == 0 and b["chosen_completion_mask"][r, n] == 1
        assert b["rejected_completion_mask"][r, :n].sum() == 0 and b["rejected_completion_mask"][r, n] == 1


def test_preference_multi_turn_prompt(tok_dirs, tmp_path):
    prompt = [U("Hi"), A("Yes."), U("Why?")]
    records = [{"prompt": prompt, "chosen": "Maybe.", "rejected": "No."},
               {"chosen": prompt + [A("Maybe.")], "rejected": prompt + [A("No.")]}]  # implicit prompt: the same
    tok, data = prepare(tmp_path, tok_dirs["plain"], "preference", records, max_length=64)
    p = (enc(tok, "<|im_start|>user\nHi<|im_end|>\n") + enc(tok, "<|im_start|>assistant\n")
         + enc(tok, "Yes.<|im_end|>\n") + enc(tok, "<|im_start|>user\nWhy?<|im_end|>\n")
         + enc(tok, "<|im_start|>assistant\n"))
    chosen, rejected = enc(tok, "Maybe.<|im_end|>\n") + [2], enc(tok, "No.<|im_end|>\n") + [2]
    T = bucket(len(p) + max(len(chosen), len(rejected)))
    b = one_batch(data, 2)
    np.testing.assert_array_equal(b["chosen_input_ids"], right_pad([p + chosen] * 2, T, 0))
    np.testing.assert_array_equal(b["rejected_input_ids"], right_pad([p + rejected] * 2, T, 0))
    # the loss covers the final reply only, not the prompt's earlier assistant turn
    np.testing.assert_array_equal(b["chosen_completion_mask"],
                                  right_pad([[0] * len(p) + [1] * len(chosen)] * 2, T, 0))
    # and the prompt ids are those a sampler is given for the same prompt
    assert data.dataset["prompt_ids"] == [p, p]


def test_prompt_rendering_left_padded(tok_dirs, tmp_path):
    tok, data = prepare(tmp_path, tok_dirs["plain"], "prompt", [
        {"prompt": "What is two plus two?", "answer": "4"},
        {"messages": [S("Be brief."), U("Hi"), A("Yes.")], "id": 3},
    ], max_length=64)
    rows = [enc(tok, "<|im_start|>user\nWhat is two plus two?<|im_end|>\n") + enc(tok, "<|im_start|>assistant\n"),
            enc(tok, "<|im_start|>system\nBe brief.<|im_end|>\n") + enc(tok, "<|im_start|>user\nHi<|im_end|>\n")
            + enc(tok, "<|im_start|>assistant\n")]
    T = bucket(max(map(len, rows)))
    b = one_batch(data, 2)
    exp = np.zeros((2, T), np.int32)
    att = np.zeros((2, T), np.int32)
    for r, s in enumerate(rows):
        exp[r, T - len(s):] = s
        att[r, T - len(s):] = 1
    np.testing.assert_array_equal(b["input_ids"], exp)
    np.testing.assert_array_equal(b["attention_mask"], att)
    assert b["extra"] == [{"answer": "4"}, {"id": 3}]


# --------------------------------------------------------------------------------------- bad template

def test_template_not_prefix_consistent_is_a_data_error(tok_dirs, tmp_path):
    # marks the last message: the rendering of a prefix is not a prefix of the whole
    tmpl = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    records = [{"messages": [U("Hi"), A("Yes.")]}]
    with pytest.raises(DataError, match=r"sft.jsonl:1: the chat template does not render this conversation "
                                        r"prefix-consistently"):
        prepare(tmp_path / "a", tok_dirs["plain"], "sft", records, chat_template=tmpl)
    with pytest.raises(JaxalignError, match="every record was dropped or skipped"):
        prepare(tmp_path / "b", tok_dirs["plain"], "sft", records, chat_template=tmpl, on_error="skip")
    # with a good record next to it the bad one is a counted skip
    tmpl2 = ("{% for m in messages %}{{ m['content'] }}{% if loop.last and m['content'] == 'Hi' %}!{% endif %}"
             "{% endfor %}")
    tok, data = prepare(tmp_path / "c", tok_dirs["plain"], "sft", records + [{"messages": [U("Hello"), A("No.")]}],
                        chat_template=tmpl2, on_error="skip")
    assert data.stats["bad_records_skipped"] == 1 and data.stats["examples"] == 1
    assert data.stats["dropped_for_length"] == 0
    assert list(data.dataset["where"]) == [f"{tmp_path}/c/sft.jsonl:2"]
