"""The benchmark entry point runs (one step of every kind on the tiny preset, the sampler, and the torch
side-by-sides) and appends a complete results line; no speed is asserted (speed lives in bench/README.md)."""
import json
import math

from bench import run


def test_bench_runs_every_kind_and_records_it(tmp_path):
    out = tmp_path / "results.jsonl"
    line = run.main(["--suite", "cpu", "--preset", "tiny", "--steps", "1", "--batch", "8", "--length", "64", "--torch",
                     "--sampler-batch", "2", "--sampler-prompt", "8", "--sampler-new", "4", "--out", str(out)])
    stored = json.loads(out.read_text().splitlines()[-1])
    assert stored["settings"]["preset"] == "tiny" and stored["commit"] and stored["peak_flops"] > 0
    for kind in run.KINDS[:-1]:
        r = line["results"][kind]
        assert r["step_time_s"] > 0 and r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1, (kind, r)
        assert math.isfinite(r["compile_s"]), kind
    # XLA's memory analysis of the compiled step exists for the offline kinds (the dry run's), not for rollouts
    assert all(line["results"][k]["step_memory_bytes"] > 0 for k in ("sft", "rm", "dpo"))
    assert line["results"]["grpo"]["step_memory_bytes"] is None
    for kind in ("grpo", "ppo"):  # the rollout's share of the step (generation, scoring, log-probs)
        assert 0 < line["results"][kind]["rollout_share"] < 1
    assert line["results"]["torch_sft_step_time_s"] > 0
    s = line["results"]["sampler"]
    assert s["prompt_tokens"] >= 2 * 4 and s["new_tokens"] == 4
    assert s["prefill_tokens_per_sec"] > 0 and s["decode_tokens_per_sec"] > 0 and s["vs_generate"] > 0
    # the bound: every parameter byte read once per decode step, at the bandwidth measured in the run
    assert s["bound_s"] == s["param_bytes"] / s["bandwidth"] and s["of_bound"] > 0


def test_isolated_kinds_run_in_their_own_processes(tmp_path):
    out = tmp_path / "results.jsonl"
    line = run.main(["--suite", "cpu", "--preset", "tiny", "--steps", "1", "--batch", "8", "--length", "32",
                     "--kinds", "sft,sampler", "--isolate", "--sampler-batch", "2", "--sampler-prompt", "8",
                     "--sampler-new", "2", "--out", str(out)])
    assert set(line["results"]) == {"sft", "sampler"} and line["results"]["sft"]["step_time_s"] > 0
    assert len(out.read_text().splitlines()) == 1  # the children wrote to their own files


def test_fit_finds_the_largest_layer_count_that_fits(tmp_path):
    """bench.fit on the small preset with a budget below its full size: the answer fits, one more layer does not
    (every probe is a real dry-run compile), and LoRA fits more than full fine-tuning."""
    from bench import fit
    out = tmp_path / "results.jsonl"
    line = fit.main(["--presets", "small", "--seq", "128", "--memory-gib", "0.28", "--memory-fraction", "1",
                     "--modes", "full,lora", "--out", str(out)])
    full, lora = line["results"]
    best = full["largest"]
    assert best is not None and 0 < best["layers"] < 6 and best["fits"]
    probed = {p["layers"]: p for p in full["probes"]}
    assert not probed[best["layers"] + 1]["fits"] and probed[best["layers"] + 1]["needed"] > best["needed"]
    assert lora["largest"]["layers"] > best["layers"]
    assert json.loads(out.read_text())["kind"] == "fit"


def test_profile_reads_a_trace_and_ranks_ops(tmp_path):
    import collections

    import jax
    import jax.numpy as jnp

    from bench import profile
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        f(x).block_until_ready()
    times = profile.op_times(str(tmp_path))  # parses; XLA:CPU emits op events only with its traceme flag
    assert all(t >= 0 for t in times.values())
    fake = collections.Counter({"fusion.1": 0.003, "fusion.2": 0.001, "while.3": 0.5, "dot.4": 0.004})
    text = profile.report(collections.Counter({k: v for k, v in fake.items() if not k.startswith("while")}), top=2,
                          steps=2)
    assert "4.0 ms a step" in text and text.index("fusion") < text.index("top ops")
    assert text.splitlines()[1].split()[-1] == "fusion" and "  2.00 ms" in text  # fusion.1 + .2 = 4 ms / 2 steps
    assert "no XLA op events" in profile.report(collections.Counter())
