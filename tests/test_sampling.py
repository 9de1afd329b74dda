"""The KV-cache sampler (jaxalign/sampling/sampler.py): greedy parity with `transformers` generate for every
family (with EOS, repetition penalty, no-repeat n-grams), sampled log-probs against the training forward,
EOS/stop handling, seeding and row independence, sharded = unsharded, the logits processors against NumPy
references, the empirical sampling distribution, and input validation.

Compiles dominate the cost: every distinct (model, shapes, SamplingParams) is one program, so the tests
share the prompt batch PROMPTS, N new tokens and a few settings (jit's in-memory cache serves repeats).
"""
import contextlib

import jax
import numpy as np
import pytest
import torch

from jaxalign import JaxalignError, loading, sampling
from jaxalign.parallel.mesh import make_mesh
from jaxalign.sampling import sampler
from jaxalign.sampling.sampler import (SampleOutput, SamplingParams, apply_repetition_penalty,
                                       banned_ngram_tokens, truncate_logits)
from tests import hf_models

FAMILIES = sorted(hf_models.FAMILIES)
VOCAB = 128
PAD = 0
EOS = 2           # the tiny models' config eos_token_id
N = 10            # max_new_tokens of the shared settings
LENGTHS = (5, 9, 3, 7, 1, 8, 4, 6)
MAIN = "mistral"  # the family most tests use (GQA + a sliding window shorter than the sequences)


def make_prompts(seed=0, lengths=LENGTHS, prefix=()):
    """Random prompts of mixed lengths, tokens in [3, VOCAB) (never pad, bos or eos)."""
    rng = np.random.default_rng(seed)
    return [list(prefix) + rng.integers(3, VOCAB, size=n).tolist() for n in lengths]


PROMPTS = make_prompts()
IDS, MASK = sampling.left_pad(PROMPTS, PAD)
B, P = IDS.shape


# ------------------------------------------------------------------------------------------ helpers

_TORCH = {}


@contextlib.contextmanager
def torch_one_thread():
    """Torch on one thread while it runs here: its OpenMP workers stall for seconds against XLA's CPU
    threads on a small machine (the thread count is restored for the other test modules)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_model(family):
    """The torch model hf_model_dir saved (hf_models.build is seeded), built once per module."""
    if family not in _TORCH:
        with torch_one_thread():
            _TORCH[family] = hf_models.build(family)
    return _TORCH[family]


@pytest.fixture(scope="module")
def lm_of(hf_model_dir):
    """lm_of(family, mesh_shape=None): the tiny model loaded once per module (default: one device)."""
    cache = {}

    def get(family, mesh_shape=None):
        key = (family, mesh_shape)
        if key not in cache:
            mesh = None
            if mesh_shape is not None:
                devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else None
                mesh = make_mesh(mesh_shape, devices)
            cache[key] = loading.from_pretrained(hf_model_dir(family), mesh=mesh, log=lambda *a: None)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def lm(lm_of):
    return lm_of(MAIN)


def gen(lm, ids=IDS, mask=MASK, **kw):
    """sampling.generate with the shared defaults, outputs as numpy."""
    out = sampling.generate(lm, ids, mask, **{"max_new_tokens": N, **kw})
    return SampleOutput(*(np.asarray(x) for x in out))


def stop_points(free_tokens, stops):
    """(lengths, stopped) a generation with these stop tokens has, given the same run without stops."""
    lengths, stopped = [], []
    for row in free_tokens:
        hit = [t for t, x in enumerate(row) if int(x) in stops]
        lengths.append(hit[0] + 1 if hit else len(row))
        stopped.append(bool(hit))
    return np.asarray(lengths), np.asarray(stopped)


def check_stops(out, free, stops, pad):
    """`out` is the stop-free greedy run `free` cut at its first stop token, then padded."""
    lengths, stopped = stop_points(free.tokens, stops)
    np.testing.assert_array_equal(out.lengths, lengths)
    np.testing.assert_array_equal(out.stopped_on_eos, stopped)
    assert out.tokens.shape == out.logprobs.shape == (len(lengths), free.tokens.shape[1])
    valid = np.arange(out.tokens.shape[1])[None] < lengths[:, None]
    np.testing.assert_array_equal(np.where(valid, out.tokens, -1), np.where(valid, free.tokens, -1))
    assert (out.tokens[~valid] == pad).all()
    assert (out.logprobs[~valid] == 0).all()
    np.testing.assert_allclose(out.logprobs[valid], free.logprobs[valid], atol=1e-5)
    for r, L in enumerate(lengths):
        if stopped[r]:
            assert int(out.tokens[r, L - 1]) in stops
    assert sampling.completions(out) == [free.tokens[r, :L - int(s)].tolist()
                                         for r, (L, s) in enumerate(zip(lengths, stopped))]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def hf_generate(model, ids, mask, max_new_tokens=N, **kw):
    """HF greedy generate: (new tokens [B, max_new_tokens] padded with PAD, raw logits [B, steps, V])."""
    with torch.no_grad(), torch_one_thread():
        r = model.generate(torch.as_tensor(ids, dtype=torch.long),
                           attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=False,
                           max_new_tokens=max_new_tokens, pad_token_id=PAD, output_logits=True,
                           return_dict_in_generate=True, **kw)
    new = r.sequences[:, ids.shape[1]:].numpy()
    tokens = np.full((len(ids), max_new_tokens), PAD, np.int64)
    tokens[:, :new.shape[1]] = new
    return tokens, torch.stack(r.logits, 1).float().numpy()


def pick_stop(tokens, exclude=()):
    """A token some row first generates mid-way and some other row never generates (so a run with it as
    EOS has rows stopping on it and rows running to max_new_tokens)."""
    n = tokens.shape[1]
    for t in range(2, n - 2):
        for r in range(len(tokens)):
            x = int(tokens[r, t])
            if x in (PAD, EOS, *exclude) or x in tokens[r, :t]:
                continue
            if any(x not in row for row in tokens):
                return x
    raise AssertionError(f"no usable stop token in\n{tokens}")


# ------------------------------------------------------------------------------------ 1. HF parity

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(family, lm_of):
    model, lm = torch_model(family), lm_of(family)
    free, _ = hf_generate(model, IDS, MASK, eos_token_id=None)
    eos = pick_stop(free)
    hf_tokens, hf_logits = hf_generate(model, IDS, MASK, eos_token_id=eos)
    lengths, stopped = stop_points(free, {eos})
    assert stopped.any() and not stopped.all(), (eos, free)

    out = gen(lm, temperature=0, eos_token_id=eos)
    assert out.tokens.shape == (B, N) and out.tokens.dtype == np.int32
    np.testing.assert_array_equal(out.lengths, lengths)
    np.testing.assert_array_equal(out.stopped_on_eos, stopped)
    valid = np.arange(N)[None] < lengths[:, None]
    assert (hf_tokens[~valid] == PAD).all()  # HF pads finished rows too
    np.testing.assert_array_equal(out.tokens, hf_tokens)
    assert not out.truncated.any()
    # Greedy log-probs are log softmax(logits) (T = 1) of HF's step logits.
    ref = np.take_along_axis(log_softmax(hf_logits), hf_tokens[:, :hf_logits.shape[1], None], -1)[..., 0]
    diff = np.abs(out.logprobs[:, :ref.shape[1]] - ref)[valid[:, :ref.shape[1]]]
    assert diff.max() <= 1e-4, diff.max()
    assert (out.logprobs[~valid] == 0).all()


# HF counts the pad slots of input_ids as tokens for both processors (jaxalign does not): pad with a
# token every prompt starts with twice, so the two agree on what was "seen" and on the prompt's bigrams.
PEN_PAD = 3
PEN_IDS, PEN_MASK = sampling.left_pad(make_prompts(seed=1, prefix=(PEN_PAD, PEN_PAD)), PEN_PAD)


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
@pytest.mark.parametrize("options", [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2)],
                         ids=["repetition_penalty", "no_repeat_ngram"])
def test_greedy_with_penalties_matches_hf_generate(family, options, lm_of):
    model = torch_model(family)
    hf_tokens, _ = hf_generate(model, PEN_IDS, PEN_MASK, eos_token_id=None, **options)
    plain, _ = hf_generate(model, PEN_IDS, PEN_MASK, eos_token_id=None)
    assert (hf_tokens != plain).any()  # the option changes the output, so the comparison means something

    out = gen(lm_of(family), PEN_IDS, PEN_MASK, temperature=0, eos_token_id=[], **options)
    np.testing.assert_array_equal(out.tokens, hf_tokens)
    assert (out.lengths == N).all() and not out.stopped_on_eos.any()
    assert out.truncated.any()
    if "no_repeat_ngram_size" in options:  # no generated token completes a bigram seen before it
        for r in range(B):
            seq = [int(x) for x in PEN_IDS[r][PEN_MASK[r]]] + out.tokens[r].tolist()
            for j in range(len(seq) - N, len(seq)):
                assert (seq[j - 1], seq[j]) not in set(zip(seq[:j - 1], seq[1:j])), (r, j)


# ------------------------------------------------------------------------- 2. log-probs vs the forward

@pytest.mark.parametrize("family,temperature", [("mistral", 0.7), ("mistral", 1.0), ("gpt2", 0.7), ("gpt2", 1.0)])
def test_sampled_logprobs_match_training_forward(family, temperature, lm_of):
    lm = lm_of(family)
    out = gen(lm, temperature=temperature, seed=7)
    valid = np.arange(N)[None] < out.lengths[:, None]
    full_ids = np.concatenate([IDS, out.tokens], axis=1)
    full_mask = np.concatenate([MASK, valid], axis=1)
    logits = np.asarray(lm(full_ids, full_mask))[:, P - 1:P + N - 1]  # the logits each new token was drawn at
    ref = np.take_along_axis(log_softmax(logits / temperature), out.tokens[..., None].astype(np.int64), -1)[..., 0]
    diff = np.abs(out.logprobs - ref)[valid]
    assert diff.max() <= 1e-5, diff.max()
    assert (out.logprobs[~valid] == 0).all()
    assert not out.truncated.any()  # no filter: the tokens were drawn from exactly that distribution
    assert (out.tokens[valid] != logits.argmax(-1)[valid]).any()  # it sampled (not greedy)


# ------------------------------------------------------------------------------ 3. top_k=1 = greedy

@pytest.fixture(scope="module")
def free_greedy(lm):
    """MAIN's greedy run without any stop token (the reference several tests cut)."""
    out = gen(lm, temperature=0, eos_token_id=[])
    assert (out.lengths == N).all() and not out.stopped_on_eos.any()
    return out


@pytest.mark.parametrize("seed", [0, 5])
def test_top_k_1_is_greedy(seed, lm, free_greedy):
    out = gen(lm, temperature=1.0, top_k=1, eos_token_id=[], seed=seed)
    np.testing.assert_array_equal(out.tokens, free_greedy.tokens)
    np.testing.assert_allclose(out.logprobs, free_greedy.logprobs, atol=1e-6)  # both under T = 1
    assert out.truncated.all()  # top-k cut the other 127 tokens


# ----------------------------------------------------------------------------------------- 4. EOS

def test_eos_and_extra_stop_tokens(lm, free_greedy):
    e1 = pick_stop(free_greedy.tokens)
    e2 = pick_stop(free_greedy.tokens, exclude=(e1,))
    pad = next(x for x in range(VOCAB - 1, 2, -1) if x not in (e1, e2))
    a = gen(lm, temperature=0, eos_token_id=e1, stop_token_ids=[e2], pad_token_id=pad)
    check_stops(a, free_greedy, {e1, e2}, pad)
    _, stopped = stop_points(free_greedy.tokens, {e1, e2})
    assert stopped.any() and not stopped.all()
    assert (a.lengths[~stopped] == N).all()
    # EOS as a list: the same stop set.
    b = gen(lm, temperature=0, eos_token_id=[e2, e1], pad_token_id=pad)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # Only e1 (the model's default pad is used after the stop).
    c = gen(lm, temperature=0, eos_token_id=e1)
    check_stops(c, free_greedy, {e1}, PAD)


def test_stop_ids_resolution(lm):
    cfg = lm.config
    assert sampler.stop_ids(cfg) == (EOS,)                     # the model config's EOS by default
    assert sampler.stop_ids(cfg, 5) == (5,)
    assert sampler.stop_ids(cfg, np.int64(5), [9, 5]) == (5, 9)
    assert sampler.stop_ids(cfg, [7, 4], (4,)) == (4, 7)
    assert sampler.stop_ids(cfg, [], ()) == ()
    assert sampler.stop_ids(cfg, None, [9]) == (EOS, 9)


def test_all_rows_stop_early(lm, free_greedy):
    stops = {int(x) for x in free_greedy.tokens[:, 1]}  # every row stops within 2 tokens
    out = gen(lm, temperature=0, eos_token_id=[], stop_token_ids=sorted(stops))
    assert out.tokens.shape == out.logprobs.shape == (B, N)
    assert out.stopped_on_eos.all() and (out.lengths <= 2).all()
    check_stops(out, free_greedy, stops, PAD)
    assert (out.tokens[:, 2:] == PAD).all()


# ------------------------------------------------------------------------------- 5. seeds and rows

def test_seeds(lm):
    a = gen(lm, temperature=1.0, seed=7)
    b = gen(lm, temperature=1.0, seed=7)
    c = gen(lm, temperature=1.0, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert (a.tokens != c.tokens).any()
    assert a.lengths.sum() > B  # rows are not all stopping at once: the comparison covers many draws


def test_row_sample_independent_of_batch_and_padding(lm):
    big = gen(lm, temperature=1.0, seed=7)
    r = 2  # a 3-token prompt
    alone = gen(lm, *sampling.left_pad([PROMPTS[r]], PAD), temperature=1.0, seed=7, row_ids=[r])
    ids, mask = sampling.left_pad([PROMPTS[5], PROMPTS[r]], PAD, multiple=16)
    assert ids.shape == (2, 16)
    padded = gen(lm, ids, mask, temperature=1.0, seed=7, row_ids=[5, r])
    for other, rows in ((alone, [(0, r)]), (padded, [(0, 5), (1, r)])):
        for i, j in rows:
            np.testing.assert_array_equal(other.tokens[i], big.tokens[j])
            assert other.lengths[i] == big.lengths[j] and other.stopped_on_eos[i] == big.stopped_on_eos[j]
            np.testing.assert_allclose(other.logprobs[i], big.logprobs[j], atol=1e-5)
    # A different row id is a different stream.
    moved = gen(lm, *sampling.left_pad([PROMPTS[r]], PAD), temperature=1.0, seed=7, row_ids=[r + 1])
    assert (moved.tokens != alone.tokens).any()


# --------------------------------------------------------------------------------------- 6. meshes

@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_equals_unsharded(mesh_shape, lm_of):
    one, sharded = lm_of(MAIN, (1, 1, 1)), lm_of(MAIN, mesh_shape)
    assert one.mesh.devices.size == 1 and sharded.mesh.devices.size == 8
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=7)):
        raw = sampling.generate(sharded, IDS, MASK, max_new_tokens=N, **kw)
        assert len(raw.tokens.sharding.device_set) == 8
        got, ref = SampleOutput(*(np.asarray(x) for x in raw)), gen(one, **kw)
        for name in ("tokens", "lengths", "stopped_on_eos", "truncated"):
            np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=f"{kw} {name}")
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)


# ------------------------------------------------------------------------ 7. processors vs NumPy

def np_truncate(x, top_k=0, top_p=1.0, min_p=0.0):
    """transformers' TopK, TopP, MinP warpers (min_tokens_to_keep=1), in that order, float64."""
    x = np.array(x, np.float64)
    V = x.shape[-1]
    if top_k:
        kth = np.sort(x, axis=-1)[:, -min(top_k, V)][:, None]
        x[x < kth] = -np.inf
    if top_p < 1:
        for row in x:
            order = np.argsort(row, kind="stable")              # ascending
            cum = np.cumsum(softmax(row[order]))
            remove = cum <= 1 - top_p
            remove[-1] = False                                  # keep at least one
            row[order[remove]] = -np.inf
    if min_p:
        probs = softmax(x)
        x[probs < min_p * probs.max(-1, keepdims=True)] = -np.inf
    return x


TRUNCATIONS = [dict(top_k=1), dict(top_k=5), dict(top_k=127), dict(top_k=128), dict(top_k=500),
               dict(top_p=0.05), dict(top_p=0.5), dict(top_p=0.9), dict(top_p=0.999),
               dict(min_p=0.05), dict(min_p=0.3), dict(top_k=20, top_p=0.8), dict(top_p=0.9, min_p=0.1),
               dict(top_k=10, top_p=0.7, min_p=0.2)]


@pytest.mark.parametrize("options", TRUNCATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_truncate_logits_matches_numpy(options):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((16, VOCAB)) * rng.uniform(0.5, 4, size=(16, 1))).astype(np.float32)
    ours = np.asarray(truncate_logits(jax.numpy.asarray(x), SamplingParams(**options)))
    ref = np_truncate(x, **options)
    kept = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(ours), kept)
    assert (ours[~kept] == -np.inf).all()
    np.testing.assert_array_equal(ours[kept], x[kept])  # kept logits untouched
    assert kept.sum(-1).min() >= 1
    if options.get("top_p", 1) < 0.9 or options.get("top_k", VOCAB) < VOCAB or options.get("min_p"):
        assert (kept.sum(-1) < VOCAB).all()  # the case cut something


def test_truncate_logits_top_p_keeps_the_smallest_covering_set():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps {0.5, 0.3}; 0.81 also needs 0.15; 0.4 keeps one.
    x = np.log(np.array([[0.15, 0.5, 0.05, 0.3]], np.float32))
    for top_p, kept in ((0.4, [1]), (0.79, [1, 3]), (0.81, [0, 1, 3]), (0.96, [0, 1, 2, 3])):
        out = np.asarray(truncate_logits(jax.numpy.asarray(x), SamplingParams(top_p=top_p)))
        assert np.flatnonzero(np.isfinite(out[0])).tolist() == kept, top_p


@pytest.mark.parametrize("penalty", [1.3, 0.8, 1.0])
def test_repetition_penalty_matches_numpy(penalty):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, VOCAB)).astype(np.float32)
    x[0, :3] = 0.0
    seen = rng.random((4, VOCAB)) < 0.3
    ours = np.asarray(apply_repetition_penalty(jax.numpy.asarray(x), jax.numpy.asarray(seen), penalty))
    ref = np.where(seen, np.where(x < 0, x * np.float32(penalty), x / np.float32(penalty)), x)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    if penalty != 1:
        nz = seen & (x != 0)
        assert ((ours[nz] < x[nz]) == (penalty > 1)).all()  # > 1 always lowers a seen token's logit


def brute_banned(seq, valid, cur, n, vocab):
    banned = np.zeros((len(seq), vocab), bool)
    for b in range(len(seq)):
        if cur < n - 1 or not valid[b, cur - n + 1:cur].all():
            continue
        suffix = tuple(seq[b, cur - n + 1:cur])
        for k in range(0, cur - n + 1):
            if valid[b, k:k + n].all() and tuple(seq[b, k:k + n - 1]) == suffix:
                banned[b, seq[b, k + n - 1]] = True
    return banned


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_banned_ngram_tokens_matches_brute_force(n):
    rng = np.random.default_rng(13 + n)
    Bn, L, V = 6, 12, 5  # a small vocabulary: lots of repeated n-grams
    seq = rng.integers(0, V, size=(Bn, L)).astype(np.int32)
    valid = np.arange(L)[None] >= rng.integers(0, 4, size=(Bn, 1))  # left padding
    valid[5, 6] = False  # a hole (a stopped row's slots): n-grams over it never count
    total = 0
    banned = jax.jit(banned_ngram_tokens, static_argnums=(3, 4))  # `cur` traced, as in the sampler's loop
    for cur in range(0, L + 1):
        ours = np.asarray(banned(seq, valid, np.int32(cur), n, V))
        ref = brute_banned(seq, valid, cur, n, V)
        np.testing.assert_array_equal(ours, ref, err_msg=f"cur={cur}")
        total += ref.sum()
    assert total > 0


@pytest.mark.parametrize("n", [12, 13, 14, 20])
def test_banned_ngram_tokens_ngram_longer_than_the_sequence(n):
    seq = np.tile(np.array([[1, 2]], np.int32), (2, 6))  # L = 12: every bigram repeats, but no n-gram fits twice
    valid = np.ones_like(seq, bool)
    ours = np.asarray(banned_ngram_tokens(jax.numpy.asarray(seq), jax.numpy.asarray(valid), 12, n, 4))
    assert not ours.any()


def test_no_repeat_ngram_longer_than_the_sequence_is_a_no_op(lm):
    # n > prompt + max_new_tokens + 1 used to crash in banned_ngram_tokens (negative window count).
    ids, mask = sampling.left_pad([[5, 6]], PAD)
    ref = gen(lm, ids, mask, max_new_tokens=3, temperature=0, eos_token_id=[])
    out = gen(lm, ids, mask, max_new_tokens=3, temperature=0, eos_token_id=[], no_repeat_ngram_size=7)
    np.testing.assert_array_equal(out.tokens, ref.tokens)


# ---------------------------------------------------------------------------- 8. empirical draws

# The tiny models' next-token distributions have long flat tails: sum(sqrt(p)) ~ 8, so the expected total
# variation of n draws is ~ 0.4 * 8 / sqrt(n) = 0.02 here (the program runs in well under a second).
DRAWS = 25000


@pytest.fixture(scope="module")
def one_token(lm):
    """(prompt token, its next-token logits [V]): the 1-token prompt whose next-token distribution is the
    most concentrated among those whose top token has < 60% (low sampling noise, still a real draw)."""
    firsts = np.arange(3, VOCAB, dtype=np.int32)[:, None]
    logits = np.asarray(lm(firsts))[:, 0]
    probs = softmax(logits)
    noise = np.sqrt(probs).sum(-1)  # E[total variation] of n draws ~ 0.4 * sum(sqrt(p)) / sqrt(n)
    noise[probs.max(-1) >= 0.6] = np.inf
    i = int(np.argmin(noise))
    return int(firsts[i, 0]), logits[i]


def draw(lm, token, **kw):
    ids = np.full((DRAWS, 1), token, np.int32)
    return gen(lm, ids, np.ones_like(ids, bool), max_new_tokens=1, temperature=1.0, eos_token_id=[], seed=3,
               **kw)


def check_histogram(tokens, probs):
    counts = np.bincount(tokens, minlength=VOCAB)
    tv = 0.5 * np.abs(counts / len(tokens) - probs).sum()
    assert tv < 0.05, tv
    # Pearson chi-square over the tokens expected >= 5 times (the rest pooled).
    expected = probs * len(tokens)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2, df = ((obs - exp) ** 2 / exp).sum(), len(obs) - 1
    assert chi2 < df + 5 * np.sqrt(2 * df), (chi2, df)


def test_empirical_distribution_temperature_1(lm, one_token):
    token, logits = one_token
    out = draw(lm, token)
    probs = softmax(logits)
    check_histogram(out.tokens[:, 0], probs)
    assert len(np.unique(out.tokens)) >= 5
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(probs[out.tokens[:, 0]]), atol=1e-5)
    assert not out.truncated.any()


def test_empirical_distribution_top_k_and_top_p(lm, one_token):
    token, logits = one_token
    probs = softmax(logits)
    top3 = np.argsort(logits)[-3:]
    out = draw(lm, token, top_k=3)
    assert set(np.unique(out.tokens).tolist()) == set(top3.tolist())
    check_histogram(out.tokens[:, 0], np.where(np.isin(np.arange(VOCAB), top3), probs, 0) / probs[top3].sum())
    assert out.truncated.all()
    # Log-probs stay those of the untruncated softmax(logits / T) (what the training forward computes).
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(probs[out.tokens[:, 0]]), atol=1e-5)

    nucleus = np.isfinite(np_truncate(logits[None], top_p=0.5)[0])
    assert 1 < nucleus.sum() < VOCAB
    out = draw(lm, token, top_p=0.5)
    assert nucleus[out.tokens[:, 0]].all()
    check_histogram(out.tokens[:, 0], np.where(nucleus, probs, 0) / probs[nucleus].sum())
    assert out.truncated.all()


# ------------------------------------------------------------------------------------- 9. bad input

def test_right_padded_prompts_rejected(lm):
    ids, mask = sampling.left_pad([[5, 6, 7], [8]], PAD)
    with pytest.raises(JaxalignError, match="left-padded"):
        sampling.generate(lm, ids[:, ::-1], mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(JaxalignError, match="shape"):
        sampling.generate(lm, ids, mask[:, :2], max_new_tokens=2)


@pytest.mark.parametrize("options", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.5), dict(top_k=-1),
                                     dict(min_p=1.0), dict(min_p=-0.1), dict(repetition_penalty=0.0),
                                     dict(no_repeat_ngram_size=-1), dict(max_new_tokens=0)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_invalid_params_rejected(options, lm):
    with pytest.raises(JaxalignError, match=next(iter(options))):
        sampling.generate(lm, IDS, MASK, **{"max_new_tokens": 2, **options})


def test_prompt_past_learned_positions_rejected(lm_of):
    # Past GPT-2's position table the model would read NaN position embeddings (jnp.take fills out of range).
    lm = lm_of("gpt2")
    assert lm.config.position == "learned" and lm.config.max_position_embeddings == 64
    ids = np.full((1, 60), 5, np.int32)
    with pytest.raises(JaxalignError, match="positions"):
        sampling.generate(lm, ids, None, max_new_tokens=8, temperature=0)
    # Positions count real tokens: left padding beyond the table is fine.
    ids, mask = sampling.left_pad([[5] * 40, [6] * 3], PAD, multiple=70)
    out = gen(lm, ids, mask, max_new_tokens=4, temperature=0, eos_token_id=[])
    assert np.isfinite(out.logprobs).all() and (out.lengths == 4).all()


def test_left_pad_and_completions():
    ids, mask = sampling.left_pad([[5, 6, 7], [8], []], pad_id=9, multiple=4)
    np.testing.assert_array_equal(ids, [[9, 5, 6, 7], [9, 9, 9, 8], [9, 9, 9, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    out = SampleOutput(tokens=np.array([[4, 2, 0], [5, 6, 7], [8, 9, 0]]), lengths=np.array([2, 3, 2]),
                       stopped_on_eos=np.array([True, False, False]), logprobs=np.zeros((3, 3)),
                       truncated=np.zeros(3, bool))
    assert sampling.completions(out) == [[4], [5, 6, 7], [8, 9]]
