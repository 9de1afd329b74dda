"""The run directory's lock (jaxalign/rundir.py) and what a run leaves in it: two `jaxalign train` processes
racing for one run directory (one trains, the other exits 2 with one line naming the holder's pid and touches
nothing), a lock file left by a dead process does not block, the lock is released on exceptions; metrics lines
carry a wall-clock time; loading a run directory logs no Orbax "Metadata file does not exist" warning; no
`datasets` progress bars in a run's output."""
import json
import logging
import os
import re
import subprocess
import sys
import time

import jax
import pytest

from jaxalign import JaxalignError, loading, rundir
from jaxalign.train.loop import read_metrics, train
from jaxalign.train.sft import TASK as SFT
from tests.configs_util import tiny_config
from tests.test_train import sort_conversations
from tests.tokenizers_util import make_tokenizer, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6

# Both processes wait for each other at a barrier inside get_config (just before `train` takes the lock),
# then each logged step sleeps a little, so the winner still holds the lock when the loser asks for it.
RECIPE = '''
import os
import time

import ml_collections


def get_config():
    barrier = os.environ.get("JAXALIGN_TEST_BARRIER")
    if barrier:
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        deadline = time.time() + 120
        while len(os.listdir(barrier)) < 2 and time.time() < deadline:
            time.sleep(0.01)
    from jaxalign.train import metrics
    write = metrics.MetricsWriter.write

    def slow_write(self, step, values):
        write(self, step, values)
        time.sleep(0.3)
    metrics.MetricsWriter.write = slow_write
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.model = dict(preset="tiny", dtype="float32", param_dtype="float32")
    c.tokenizer = dict(path={tokenizer!r})
    c.data = dict(train_files={train!r}, max_length=32)
    c.optim = dict(lr=3e-3, schedule="constant")
    c.train = dict(steps={steps}, batch_size=8, micro_batch_size=8, log_every=1, progress=False)
    c.checkpoint = dict(every=3)
    return c
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("rundir-assets")
    return {"dir": d, "tokenizer": make_tokenizer(str(d / "tokenizer")),
            "train": write_jsonl(d / "train.jsonl", sort_conversations(64, 0))}


@pytest.fixture(scope="module")
def race(assets):
    """Two `jaxalign train` processes (seeds 1 and 2) started together on one run directory, a fresh data
    cache (so the winner tokenises: its output would show datasets' progress bars)."""
    d = assets["dir"]
    recipe = d / "recipe.py"
    recipe.write_text(RECIPE.format(tokenizer=assets["tokenizer"], train=assets["train"], steps=STEPS))
    barrier = d / "barrier"
    barrier.mkdir()
    run_dir = d / "run"
    env = dict(os.environ, JAXALIGN_DATA_CACHE=str(d / "data-cache"), JAXALIGN_TEST_BARRIER=str(barrier),
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=REPO)
    t0 = time.time()
    procs = {seed: subprocess.Popen([sys.executable, "-m", "jaxalign.cli", "train", "--config", str(recipe),
                                     f"--config.run_dir={run_dir}", f"--config.seed={seed}"],
                                    env=env, cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)}
    out = {}
    try:
        for seed, p in procs.items():
            stdout, stderr = p.communicate(timeout=300)
            out[seed] = {"pid": p.pid, "rc": p.returncode, "out": stdout, "err": stderr}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"run_dir": str(run_dir), "procs": out, "t0": t0, "t1": time.time()}


def winner_and_loser(race):
    procs = race["procs"]
    rcs = sorted(p["rc"] for p in procs.values())
    assert rcs == [0, 2], {s: (p["rc"], p["err"][-2000:]) for s, p in procs.items()}
    win = next(s for s, p in procs.items() if p["rc"] == 0)
    lose = next(s for s, p in procs.items() if p["rc"] == 2)
    return win, lose


def test_second_run_on_a_run_directory_fails_with_one_line(race):
    win, lose = winner_and_loser(race)
    procs, run_dir = race["procs"], race["run_dir"]
    loser, winner = procs[lose], procs[win]
    lines = loser["err"].strip().splitlines()
    assert len(lines) == 1, loser["err"]
    assert lines[0].startswith("jaxalign: error: ") and "Traceback" not in loser["err"], loser["err"]
    assert run_dir in lines[0] and f"pid {winner['pid']}" in lines[0], lines[0]
    assert loser["out"] == "", loser["out"]
    assert f"done: step {STEPS}" in winner["out"] and "resuming" not in winner["out"], winner["out"]


def test_the_run_directory_is_the_winners_alone(race):
    win, _ = winner_and_loser(race)
    run_dir = race["run_dir"]
    rows = read_metrics(run_dir)
    assert [m["step"] for m in rows if "loss" in m] == list(range(1, STEPS + 1))
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["seed"] == win
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["3", "6"]
    with open(rundir.lock_path(run_dir)) as f:
        assert f.read() == ""  # released


def test_metrics_lines_carry_wall_clock_time(race):
    winner_and_loser(race)
    times = [m["time"] for m in read_metrics(race["run_dir"])]
    assert times == sorted(times) and race["t0"] <= times[0] and times[-1] <= race["t1"], times
    assert times[-1] - times[0] >= 0.3 * (STEPS - 1) * 0.9  # the recipe's sleeps between the lines


def test_no_datasets_progress_bars_or_orbax_metadata_warning_in_a_run(race):
    win, _ = winner_and_loser(race)
    err = race["procs"][win]["err"]
    for noise in ("Map", "Filter", "Saving the dataset", "tokenizing:", "examples/s", "Metadata file does not exist"):
        assert noise not in err, (noise, err[-3000:])


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_loading_a_run_directory_logs_no_metadata_warning(race):
    winner_and_loser(race)
    absl = logging.getLogger("absl")
    filters, rec = list(absl.filters), Records()
    absl.addHandler(rec)
    try:
        loading.from_pretrained(race["run_dir"])
        absl.warning("Metadata file does not exist: a message outside the load")  # still passes
    finally:
        absl.removeHandler(rec)
    assert [m for m in rec.messages if "Metadata file does not exist" in m] == [
        "Metadata file does not exist: a message outside the load"], rec.messages
    assert absl.filters == filters


# ------------------------------------------------------------------------------------------ unit tests

def test_lock_file_of_a_dead_process_does_not_block(tmp_path):
    path = rundir.lock_path(str(tmp_path))
    with open(path, "w") as f:  # what a killed run leaves: its pid, no flock (the kernel dropped it)
        json.dump({"pid": 2 ** 22 + 12345, "host": "gone"}, f)
    with rundir.locked(str(tmp_path)):
        with open(path) as f:
            assert json.load(f)["pid"] == os.getpid()
    for junk in ("not json", "[1, 2]", ""):
        with open(path, "w") as f:
            f.write(junk)
        with rundir.locked(str(tmp_path)):
            pass


def test_held_lock_blocks_and_is_released_on_exceptions(tmp_path):
    with pytest.raises(RuntimeError):
        with rundir.locked(str(tmp_path)):
            with pytest.raises(JaxalignError, match=re.escape(f"{tmp_path}: ") + rf".*pid {os.getpid()} on "):
                rundir.RunDirLock(str(tmp_path)).acquire()
            raise RuntimeError("boom")
    with rundir.locked(str(tmp_path)):  # free again
        pass
    with rundir.locked(str(tmp_path), enabled=False), rundir.locked(str(tmp_path)):
        pass  # processes other than 0 of a multi-host run do not lock


def test_train_on_a_locked_run_directory_touches_nothing(assets, tmp_path):
    cfg = tiny_config("sft", tmp_path / "run", assets["tokenizer"], assets["train"], str(tmp_path / "cache"),
                      train__steps=1, train__batch_size=8)
    os.makedirs(cfg.run_dir)
    with rundir.locked(cfg.run_dir):
        with pytest.raises(JaxalignError, match="another run is using this run directory"):
            train(cfg, SFT, log=lambda *_: None)
    assert os.listdir(cfg.run_dir) == [".lock"] and not os.path.exists(tmp_path / "cache")
