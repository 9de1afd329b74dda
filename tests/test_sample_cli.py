"""Batch prediction and chat over the sampler (jaxalign/sampling/batch.py, `jaxalign sample` / `chat`):
rows match the sampler on the rendered prompts, records' extra fields are kept, a killed run (a torn last
line) resumes to exactly the uninterrupted output, bad input names its file and line."""
import json
import re

import numpy as np
import pytest

from jaxalign import JaxalignError, cli, loading, sampling
from jaxalign.data import templates
from jaxalign.models import ModelConfig
from jaxalign.sampling import batch
from tests.tokenizers_util import make_tokenizer, write_jsonl

PROMPTS = [{"prompt": "Hello there", "id": "a"}, {"messages": [{"role": "user", "content": "Name a color."}]},
           {"prompt": [{"role": "user", "content": "Sort the list 3 1 2"}], "id": "c"},
           {"messages": [{"role": "user", "content": "Yes?"}, {"role": "assistant", "content": "No."}]},
           {"prompt": "What is two plus two?", "answer": 4}]
GEN = dict(max_new_tokens=6, temperature=1.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample-cli")
    tok_dir = make_tokenizer(str(d / "tok"))
    tok = templates.load_tokenizer(tok_dir)
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.5)
    out = str(d / "model")
    loading.from_config(cfg, seed=3).save(out, tokenizer_dir=tok_dir)
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "p.jsonl", PROMPTS)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_rows_match_the_sampler_and_keep_extra_fields(model_dir, prompts_file, tmp_path):
    out = str(tmp_path / "out.jsonl")
    n = batch.predict_file(model_dir, prompts_file, out, batch_size=4, progress=False, log=lambda *a: None,
                           max_new_tokens=6, temperature=0.0)
    rows = read(out)
    assert n == len(rows) == len(PROMPTS)
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    assert rows[0]["id"] == "a" and rows[2]["id"] == "c" and rows[4]["answer"] == 4
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["num_tokens"] <= 6 for r in rows)
    # independently: render each prompt, run the sampler alone on it, decode
    lm, tok, renderer = batch.load(model_dir)
    for rec, row in zip(PROMPTS, rows):
        msgs = rec.get("messages") or rec["prompt"]
        msgs = [{"role": "user", "content": msgs}] if isinstance(msgs, str) else msgs
        msgs = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs  # a final reply is generated afresh
        ids, mask = sampling.left_pad([renderer.prompt(msgs, "t")], renderer.pad_id)
        res = sampling.generate(lm, ids, mask, max_new_tokens=6, temperature=0.0,
                                stop_token_ids=(renderer.eos_id,))
        assert row["completion"] == tok.decode(sampling.completions(res)[0], skip_special_tokens=True)
        assert row["finish_reason"] == ("stop" if bool(np.asarray(res.stopped_on_eos)[0]) else "length")


def test_a_killed_run_resumes_to_the_uninterrupted_output(model_dir, prompts_file, tmp_path):
    whole, resumed = str(tmp_path / "whole.jsonl"), str(tmp_path / "resumed.jsonl")
    kw = dict(batch_size=4, num_samples=2, progress=False, log=lambda *a: None, seed=7, **GEN)
    assert batch.predict_file(model_dir, prompts_file, whole, **kw) == 2 * len(PROMPTS)
    with open(whole) as f:
        lines = f.readlines()
    assert len({json.loads(x)["completion"] for x in lines}) > 1
    with open(resumed, "w") as f:  # three rows made it, the fourth was torn mid-write
        f.writelines(lines[:3])
        f.write(lines[3][:10])
    assert batch.predict_file(model_dir, prompts_file, resumed, **kw) == 2 * len(PROMPTS) - 3
    assert sorted(read(resumed), key=lambda r: (r["index"], r["sample"])) == \
        sorted(read(whole), key=lambda r: (r["index"], r["sample"]))
    assert batch.predict_file(model_dir, prompts_file, resumed, **kw) == 0  # nothing left to do


def test_cli_sample_and_chat(model_dir, prompts_file, tmp_path, capsys):
    out = str(tmp_path / "cli.jsonl")
    cli.main(["sample", "--model", model_dir, "--prompts", prompts_file, "--out", out, "--max-new-tokens", "4",
              "--temperature", "0", "--batch-size", "2"])
    assert len(read(out)) == len(PROMPTS)
    assert re.search(rf"wrote {len(PROMPTS)} rows .* \(\d+ tokens, [\d.]+ tok/s\)", capsys.readouterr().out)

    said = []
    history = batch.chat(model_dir, lines=["Hello there", "/reset", "Name a color.", "/exit", "never read"],
                         write=said.append, max_new_tokens=4, temperature=0.0, system="Be brief.")
    assert said[2] == "(history cleared)" and len(said) == 5  # each reply, then its tokens and speed
    assert all(re.fullmatch(r"\([1-4] tokens, [\d.]+ tok/s\)", said[i]) for i in (1, 4)), said
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "Name a color."


def test_batch_is_sized_to_the_rows_and_tokens_are_counted(model_dir, prompts_file, tmp_path, monkeypatch):
    assert [batch.batch_rows(32, n) for n in (0, 1, 5, 32, 40)] == [1, 1, 5, 32, 32]
    shapes, generate = [], batch.generate
    monkeypatch.setattr(batch, "generate", lambda lm, ids, *a, **k: shapes.append(ids.shape[0]) or
                        generate(lm, ids, *a, **k))
    out = str(tmp_path / "out.jsonl")
    n = batch.predict_file(model_dir, prompts_file, out, batch_size=32, num_samples=2, progress=False,
                           log=lambda *a: None, **GEN)
    assert n == 2 * len(PROMPTS) and shapes == [2 * len(PROMPTS)]  # 10 rows in one batch of 10, not 32
    assert n.tokens == sum(r["num_tokens"] for r in read(out)) > 0 and n.tokens_per_sec > 0


def test_bad_input_names_file_and_line(model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"nothing": 1}])
    with pytest.raises(JaxalignError, match=r"bad\.jsonl:2"):
        batch.predict_file(model_dir, bad, str(tmp_path / "o.jsonl"), progress=False, **GEN)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("not json\n")
    with pytest.raises(JaxalignError, match="foreign.jsonl: line 1"):
        batch.predict_file(model_dir, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}]), str(foreign),
                           progress=False, **GEN)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Hello there " * 60}])
    with pytest.raises(JaxalignError, match=r"long\.jsonl:1: prompt of \d+ tokens"):
        batch.predict_file(model_dir, long, str(tmp_path / "o2.jsonl"), progress=False, **GEN)
