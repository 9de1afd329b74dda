"""The benchmark entry point runs (one step of every kind on the tiny preset, and the torch side-by-side) and
appends a complete results line; no speed is asserted (speed lives in bench/README.md)."""
import json
import math

from bench import run


def test_bench_runs_every_kind_and_records_it(tmp_path):
    out = tmp_path / "results.jsonl"
    line = run.main(["--suite", "cpu", "--preset", "tiny", "--steps", "1", "--batch", "4", "--length", "64", "--torch",
                     "--out", str(out)])
    stored = json.loads(out.read_text().splitlines()[-1])
    assert stored["settings"]["preset"] == "tiny" and stored["commit"] and stored["peak_flops"] > 0
    for kind in run.KINDS:
        r = line["results"][kind]
        assert r["step_time_s"] > 0 and r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1, (kind, r)
        assert math.isfinite(r["compile_s"]), kind
    assert line["results"]["torch_sft_step_time_s"] > 0
