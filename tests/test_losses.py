"""Loss building blocks and the optimizer against independent NumPy re-implementations: chunked token
log-probs (values, gradients, stats), the SFT loss, sequence log-probs, the reductions of per-example
metrics, weight-decay masking and the learning-rate schedules. Also: jaxalign.losses exports every public
loss, and the dtype helpers the other loss tests share (float32, bfloat16, float64)."""
import contextlib
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jaxalign.losses as L
from jaxalign.losses import mean_metrics, sequence_logprobs, sft_loss, sft_sums, shift, token_logprobs, weighted_sums
from jaxalign.train import optim

# ------------------------------------------------------------------------------------ dtype helpers

DTYPES = ("float32", "bfloat16", "float64")
# bfloat16 keeps 8 significant bits (relative spacing 2^-8 ~ 0.4%): a loss of a few roundings is within ~3%.
DTYPE_TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=3e-2, atol=3e-2),
             "float64": dict(rtol=1e-10, atol=1e-10)}


@contextlib.contextmanager
def in_dtype(name):
    """The JAX dtype `name`; float64 arrays exist only under jax.enable_x64, which the block runs in."""
    if name == "float64":
        with jax.enable_x64(True):
            yield jnp.dtype("float64")
    else:
        yield jnp.dtype(name)


def as_dtype(dtype, *xs):
    """([each float array as a JAX array of `dtype`, others as they are], [the values each holds, float64
    for the floats]): the references see exactly the (rounded) inputs jaxalign gets."""
    arrays, values = [], []
    for x in xs:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            a = jnp.asarray(x, dtype)
            arrays.append(a)
            values.append(np.asarray(a).astype(np.float64))
        else:
            arrays.append(jnp.asarray(x))
            values.append(x)
    return arrays, values


def assert_dtype(dtype, **outputs):
    for name, x in outputs.items():
        assert jnp.asarray(x).dtype == dtype, (name, jnp.asarray(x).dtype, dtype)


# --------------------------------------------------------------------------------------- the API

EXPORTED = {
    "logprobs": ["masked_sum", "sequence_logprobs", "shift", "token_logprobs"],
    "sft": ["sft_loss", "sft_sums"],
    "reward": ["reward_loss", "reward_losses"],
    "preference": ["DPO_LOSS_TYPES", "cpo_loss", "cpo_losses", "dpo_loss", "dpo_losses", "dpo_pair_metrics",
                   "dpo_type_losses", "kto_kl", "kto_loss", "kto_losses", "log1mexp", "mean_token_nll",
                   "orpo_log_odds", "orpo_loss", "orpo_losses", "simpo_loss", "simpo_losses"],
    "policy": ["AGGREGATIONS", "ESTIMATORS", "SCALES", "aggregate", "gae", "group_advantages", "kl_penalty",
               "policy_loss", "policy_loss_sums", "policy_loss_terms", "value_loss", "value_loss_terms", "whiten"],
    "reduce": ["mean_loss", "mean_metrics", "weighted_sums"],
}


def test_losses_exports_every_public_function():
    import importlib
    want = {name for names in EXPORTED.values() for name in names}
    assert set(L.__all__) == want and len(L.__all__) == len(want)
    for module, names in EXPORTED.items():
        mod = importlib.import_module(f"jaxalign.losses.{module}")
        for name in names:
            assert getattr(L, name) is getattr(mod, name), name
        # every public callable of the module is exported
        public = {n for n, v in vars(mod).items() if not n.startswith("_") and callable(v)
                  and getattr(v, "__module__", None) == mod.__name__}
        assert public <= set(names), (module, sorted(public - set(names)))

B, T, D, V = 3, 10, 8, 37


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    # Make about half of the targets the argmax, so `correct` has both values.
    argmax = (hidden.astype(np.float64) @ head).argmax(-1)
    pick = rng.random((B, T)) < 0.5
    targets = np.where(pick, argmax, targets).astype(np.int32)
    return hidden, head, targets


def np_token_logprobs(hidden, head, targets, temperature=1.0):
    logits = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64) / temperature
    logp_all = np_log_softmax(logits)
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    probs = np.exp(logp_all)
    entropy = -(probs * logp_all).sum(-1)
    correct = logits.argmax(-1) == targets
    return logp, entropy, correct


def naive_token_logprobs(hidden, head, targets, temperature=1.0):
    """Unchunked JAX version: the gradient reference."""
    logits = (hidden @ head).astype(jnp.float32) / temperature
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


CHUNKS = [1, 3, 4, 5, 10, 128]  # 5 and 10 divide T=10; 3 and 4 do not; 128 is longer than T


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_token_logprobs_match_numpy(chunk, temperature):
    hidden, head, targets = inputs()
    got = token_logprobs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), chunk_size=chunk,
                         temperature=temperature)
    want, _, _ = np_token_logprobs(hidden, head, targets, temperature)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [3, 5, 128])
def test_token_logprobs_stats_match_numpy(chunk, temperature):
    hidden, head, targets = inputs(1)
    logp, stats = token_logprobs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets),
                                 chunk_size=chunk, temperature=temperature, with_stats=True)
    want_logp, want_entropy, want_correct = np_token_logprobs(hidden, head, targets, temperature)
    np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-5, rtol=0)
    # lse - sum(p * z) in float32 cancels: ~1e-5 absolute for logits of a few units
    np.testing.assert_allclose(np.asarray(stats["entropy"]), want_entropy, atol=5e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(stats["correct"]), want_correct)
    assert 0 < want_correct.sum() < want_correct.size  # both outcomes are exercised


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [3, 4, 5, 128])
def test_token_logprobs_gradient_matches_unchunked(chunk, temperature):
    hidden, head, targets = inputs(2)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(B, T)).astype(np.float32))  # arbitrary cotangent
    y = jnp.asarray(targets)

    def chunked(h, k):
        return jnp.sum(w * token_logprobs(h, k, y, chunk_size=chunk, temperature=temperature))

    def naive(h, k):
        return jnp.sum(w * naive_token_logprobs(h, k, y, temperature))

    g_h, g_k = jax.grad(chunked, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(head))
    r_h, r_k = jax.grad(naive, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(head))
    np.testing.assert_allclose(np.asarray(g_h), np.asarray(r_h), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(g_k), np.asarray(r_k), atol=1e-5, rtol=0)


def test_token_logprobs_stats_carry_no_gradient():
    hidden, head, targets = inputs(4)

    def entropy_sum(h):
        _, stats = token_logprobs(h, jnp.asarray(head), jnp.asarray(targets), chunk_size=4, with_stats=True)
        return jnp.sum(stats["entropy"])

    g = jax.grad(entropy_sum)(jnp.asarray(hidden))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_token_logprobs_under_jit():
    hidden, head, targets = inputs(5)
    f = jax.jit(lambda h, k, y: token_logprobs(h, k, y, chunk_size=4, temperature=0.5))
    want, _, _ = np_token_logprobs(hidden, head, targets, 0.5)
    np.testing.assert_allclose(np.asarray(f(hidden, head, targets)), want, atol=1e-5, rtol=0)


def test_shift():
    hidden = jnp.arange(2 * 5 * 3).reshape(2, 5, 3)
    ids = jnp.arange(10).reshape(2, 5)
    mask = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    h, y, m = shift(hidden, ids, mask)
    np.testing.assert_array_equal(h, hidden[:, :4])
    np.testing.assert_array_equal(y, ids[:, 1:])
    np.testing.assert_array_equal(m, mask[:, 1:])


# ---------------------------------------------------------------------------------------- sft_loss

def test_sft_loss_matches_numpy():
    rng = np.random.default_rng(6)
    logps = -rng.random((4, 7)).astype(np.float32) * 3
    mask = (rng.random((4, 7)) < 0.6).astype(np.int32)
    mask[0] = 0  # a row without completion tokens contributes nothing
    loss, metrics = sft_loss(jnp.asarray(logps), jnp.asarray(mask))
    want = -(logps.astype(np.float64) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["nll"]), want, rtol=1e-6)
    assert float(metrics["tokens"]) == mask.sum()


def test_sft_loss_token_mean_not_row_mean():
    # Two rows with 1 and 3 tokens: the token mean weighs the long row three times as much.
    logps = jnp.asarray([[-1.0, 0.0, 0.0], [-2.0, -2.0, -2.0]])
    mask = jnp.asarray([[1, 0, 0], [1, 1, 1]])
    loss, _ = sft_loss(logps, mask)
    np.testing.assert_allclose(float(loss), (1 + 6) / 4, rtol=1e-6)


def test_sft_loss_empty_mask_is_zero():
    loss, metrics = sft_loss(jnp.full((2, 3), -5.0), jnp.zeros((2, 3)))
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0


def sft_inputs(seed=9):
    rng = np.random.default_rng(seed)
    logps = (-rng.random((5, 7)) * 3).astype(np.float32)
    mask = (rng.random((5, 7)) < 0.6).astype(np.int32)
    mask[0] = 0  # no completion tokens: not a row of exact_match
    correct = rng.random((5, 7)) < 0.7
    correct[1] = True  # greedy reproduces row 1 ...
    correct[2] = mask[2] == 0  # ... and row 2, whose only misses are outside its mask
    mask[2, 0] = 1
    correct[2, 0] = True
    entropy = rng.uniform(0.0, 3.0, (5, 7)).astype(np.float32)
    return logps, mask, correct, entropy


def np_sft(logps, mask, correct, entropy):
    m = np.asarray(mask, np.float64)
    rows = m.sum(1) > 0
    exact = np.all(correct | (m == 0), axis=1) & rows
    n = m.sum()
    return -(np.asarray(logps, np.float64) * m).sum() / n, {
        "token_accuracy": (correct * m).sum() / n, "entropy": (np.asarray(entropy, np.float64) * m).sum() / n,
        "exact_match": exact.sum() / rows.sum(), "tokens": n}


def test_sft_sums_and_loss_match_numpy():
    logps, mask, correct, entropy = sft_inputs()
    stats = {"correct": jnp.asarray(correct), "entropy": jnp.asarray(entropy)}
    want, want_metrics = np_sft(logps, mask, correct, entropy)
    total, tokens, sums = sft_sums(jnp.asarray(logps), jnp.asarray(mask), stats)
    np.testing.assert_allclose(float(total) / float(tokens), want, rtol=1e-6)
    assert float(tokens) == mask.sum() and set(sums) == {"token_accuracy", "entropy", "exact_match"}
    for k, (num, den) in sums.items():
        np.testing.assert_allclose(float(num) / float(den), want_metrics[k], rtol=1e-6, err_msg=k)
    assert 0 < want_metrics["exact_match"] < 1
    loss, metrics = sft_loss(jnp.asarray(logps), jnp.asarray(mask), stats)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["nll"]), want, rtol=1e-6)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-6, err_msg=k)
    assert set(sft_sums(jnp.asarray(logps), jnp.asarray(mask))[2]) == set()  # no stats: no metrics


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_sft_loss_in_each_dtype(dtype_name):
    logps, mask, correct, entropy = sft_inputs()
    with in_dtype(dtype_name) as dtype:
        (lp, m, ent), (f_lp, _, f_ent) = as_dtype(dtype, logps, mask.astype(np.float32), entropy)
        loss, metrics = sft_loss(lp, m, {"correct": jnp.asarray(correct), "entropy": ent})
        jitted, _ = jax.jit(sft_loss)(lp, jnp.asarray(mask), {"correct": jnp.asarray(correct), "entropy": ent})
        assert_dtype(dtype, loss=loss, jitted=jitted, **{k.replace("/", "_"): v for k, v in metrics.items()})
        seq = sequence_logprobs(lp, m)
        seq_avg = sequence_logprobs(lp, m, average=True)
        assert_dtype(dtype, seq=seq, seq_avg=seq_avg)
    want, want_metrics = np_sft(f_lp, mask, correct, f_ent)
    tol = DTYPE_TOL[dtype_name]
    np.testing.assert_allclose(np.float64(loss), want, **tol)
    np.testing.assert_allclose(np.float64(jitted), want, **tol)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(np.float64(metrics[k]), v, err_msg=k, **tol)
    np.testing.assert_allclose(np.asarray(seq, np.float64), (f_lp * mask).sum(-1), **tol)
    np.testing.assert_allclose(np.asarray(seq_avg, np.float64),
                               (f_lp * mask).sum(-1) / np.maximum(mask.sum(-1), 1), **tol)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_token_logprobs_at_least_float32(dtype_name):
    """bfloat16 hidden states give float32 log-probs (the log-softmax is never computed in bfloat16);
    float64 stays float64."""
    hidden, head, targets = inputs(12)
    with in_dtype(dtype_name) as dtype:
        (h, k), (f_h, f_k) = as_dtype(dtype, hidden, head)
        got = token_logprobs(h, k, jnp.asarray(targets), chunk_size=4)
    assert got.dtype == (jnp.float32 if dtype_name == "bfloat16" else dtype)
    want, _, _ = np_token_logprobs(f_h, f_k, targets)
    tol = {"float32": 1e-5, "bfloat16": 0.2, "float64": 1e-10}[dtype_name]  # bf16: logits of bf16 matmuls
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol, rtol=0)


# ------------------------------------------------------------------------- per-example metric reductions

def test_mean_metrics_and_weighted_sums_agree():
    """weighted_sums with 0/1 weights is mean_metrics over the weight-1 examples, for each kind of metric:
    a plain per-example value, a masked (per-class) one and a batch-level scalar."""
    rng = np.random.default_rng(13)
    values = rng.normal(size=8).astype(np.float32)
    cls = (np.arange(8) % 3 == 0).astype(np.float32)
    weight = np.array([1, 1, 0, 1, 0, 1, 1, 1], np.float32)
    per = lambda sel: {"plain": jnp.asarray(values[sel]), "masked": (jnp.asarray(values[sel]),  # noqa: E731
                                                                     jnp.asarray(cls[sel])),
                       "scalar": jnp.float32(0.25)}
    means = mean_metrics(per(weight > 0))
    sums = weighted_sums(per(slice(None)), jnp.asarray(weight))
    for k in means:
        num, den = sums[k]
        np.testing.assert_allclose(float(num) / float(den), float(means[k]), rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(means["plain"]), values[weight > 0].mean(), rtol=1e-6)
    sel = (weight > 0) & (cls > 0)
    np.testing.assert_allclose(float(means["masked"]), values[sel].mean(), rtol=1e-6)
    assert float(means["scalar"]) == 0.25 and float(sums["scalar"][1]) == weight.sum()
    # a class with no example: mean 0, count 0
    empty = mean_metrics({"m": (jnp.asarray(values), jnp.zeros(8))})
    assert float(empty["m"]) == 0.0


# ---------------------------------------------------------------------------------- sequence_logprobs

def test_sequence_logprobs_sum_and_average():
    rng = np.random.default_rng(7)
    logps = -rng.random((5, 6)).astype(np.float32)
    mask = (rng.random((5, 6)) < 0.5).astype(np.float32)
    mask[2] = 0
    got_sum = np.asarray(sequence_logprobs(jnp.asarray(logps), jnp.asarray(mask)))
    got_avg = np.asarray(sequence_logprobs(jnp.asarray(logps), jnp.asarray(mask), average=True))
    want_sum = (logps.astype(np.float64) * mask).sum(-1)
    want_avg = want_sum / np.maximum(mask.sum(-1), 1)
    np.testing.assert_allclose(got_sum, want_sum, atol=1e-6)
    np.testing.assert_allclose(got_avg, want_avg, atol=1e-6)
    assert got_sum[2] == 0.0 and got_avg[2] == 0.0


# ------------------------------------------------------------------------------------------ optimizer

def test_decay_mask_excludes_scale_and_bias():
    params = {"embed": np.zeros(3), "final_norm": {"scale": np.zeros(3)},
              "layers": {"q": {"kernel": np.zeros(3), "bias": np.zeros(3)}, "attn_norm": {"scale": np.zeros(3),
                                                                                      "bias": np.zeros(3)}},
              "score": {"kernel": np.zeros(3)}}
    mask = optim.decay_mask(params)
    assert mask == {"embed": True, "final_norm": {"scale": False},
                    "layers": {"q": {"kernel": True, "bias": False}, "attn_norm": {"scale": False, "bias": False}},
                    "score": {"kernel": True}}


def test_decay_mask_on_model_params():
    from flax import nnx

    from jaxalign import models
    from jaxalign.models.presets import get_preset
    for preset in ("tiny", "gpt2"):
        _, state = models.abstract_params(get_preset(preset))
        params = nnx.to_pure_dict(state)
        mask = optim.decay_mask(params)
        for (path, m) in jax.tree.leaves_with_path(mask):
            name = path[-1].key
            assert m == (name not in ("scale", "bias")), (preset, jax.tree_util.keystr(path))
        names = {p[-1].key for p, _ in jax.tree.leaves_with_path(params)}
        assert "scale" in names and ("bias" in names) == (preset == "gpt2")


def optim_cfg(**kw):
    c = ml_collections.ConfigDict(dict(lr=1.0, schedule="constant", warmup_steps=0, weight_decay=0.0,
                                       clip_norm=0.0, b1=0.9, b2=0.999, eps=1e-8))
    c.update(kw)
    return c


def test_weight_decay_applies_to_masked_leaves_only():
    params = {"w": {"kernel": jnp.full((2, 2), 2.0)}, "n": {"scale": jnp.full((2,), 2.0)},
              "b": {"bias": jnp.full((2,), 2.0)}}
    tx, _ = optim.make_optimizer(optim_cfg(lr=0.5, weight_decay=0.1), 10)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]["kernel"]), -0.5 * 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["n"]["scale"]), 0.0)
    np.testing.assert_array_equal(np.asarray(updates["b"]["bias"]), 0.0)


def np_adamw(params, grads_seq, lr_fn, clip, wd, b1=0.9, b2=0.999, eps=1e-8, decay=None):
    """NumPy AdamW (optax conventions: bias-corrected moments, decoupled decay scaled by the lr) with
    global-norm clipping before it."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for t, grads in enumerate(grads_seq):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
        if clip and norm > clip:
            g = {k: x * clip / norm for k, x in g.items()}
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mh, vh = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
            u = mh / (np.sqrt(vh) + eps) + (wd * params[k] if decay[k] else 0.0)
            params[k] = params[k] - lr_fn(t) * u
    return params


def test_make_optimizer_matches_numpy_adamw():
    rng = np.random.default_rng(8)
    params = {"kernel": rng.normal(size=(3, 2)).astype(np.float32), "scale": rng.normal(size=2).astype(np.float32)}
    # Step 1's gradient has global norm >> clip_norm, step 2's and 3's are below it.
    grads_seq = [{k: (s * rng.normal(size=x.shape)).astype(np.float32) for k, x in params.items()}
                 for s in (10.0, 0.05, 0.2)]
    cfg = optim_cfg(lr=0.1, schedule="linear", warmup_steps=1, weight_decay=0.3, clip_norm=1.0)
    tx, lr_fn = optim.make_optimizer(cfg, 4)
    p = {k: jnp.asarray(x) for k, x in params.items()}
    state = tx.init(p)
    for g in grads_seq:
        updates, state = tx.update({k: jnp.asarray(x) for k, x in g.items()}, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, updates)
    want = np_adamw(params, grads_seq, lambda t: float(lr_fn(t)), 1.0, 0.3, decay={"kernel": True, "scale": False})
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], atol=1e-6, rtol=1e-6)
    # Without clipping the result differs (the first gradient dominates the moments).
    unclipped = np_adamw(params, grads_seq, lambda t: float(lr_fn(t)), 0.0, 0.3,
                         decay={"kernel": True, "scale": False})
    assert not np.allclose(unclipped["kernel"], want["kernel"], atol=1e-4)


def values(fn, steps):
    return np.asarray([float(fn(s)) for s in steps])


def test_schedule_cosine_with_warmup():
    # lr 1, 2 warmup steps, 10 total: warmup 0 -> 1 over steps 0..2, then cosine over the 8 remaining.
    fn = optim.schedule(1.0, "cosine", 2, 10)
    want = [0.0, 0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 9)]
    np.testing.assert_allclose(values(fn, range(11)), want, atol=1e-6)
    np.testing.assert_allclose(float(fn(6)), 0.5, atol=1e-6)  # half way through the decay


def test_schedule_cosine_end_factor():
    fn = optim.schedule(2.0, "cosine", 0, 4, end_factor=0.1)
    want = [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4))) for k in range(5)]
    np.testing.assert_allclose(values(fn, range(5)), want, atol=1e-6)
    np.testing.assert_allclose(float(fn(4)), 0.2, atol=1e-6)


def test_schedule_linear():
    fn = optim.schedule(1e-3, "linear", 4, 12)
    want = [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 8.75e-4, 7.5e-4, 6.25e-4, 5e-4, 3.75e-4, 2.5e-4, 1.25e-4, 0.0]
    np.testing.assert_allclose(values(fn, range(13)), want, atol=1e-9)
    fn = optim.schedule(1.0, "linear", 0, 5, end_factor=0.5)
    np.testing.assert_allclose(values(fn, range(6)), [1.0, 0.9, 0.8, 0.7, 0.6, 0.5], atol=1e-6)


def test_schedule_constant_and_warmup():
    np.testing.assert_allclose(values(optim.schedule(0.3, "constant", 0, 5), range(6)), 0.3, atol=1e-7)
    np.testing.assert_allclose(values(optim.schedule(0.3, "constant", 3, 10), range(6)),
                               [0.0, 0.1, 0.2, 0.3, 0.3, 0.3], atol=1e-7)


def test_schedule_warmup_longer_than_run_is_clipped():
    fn = optim.schedule(1.0, "cosine", 100, 5)  # warmup clipped to 4 steps, one decay step
    np.testing.assert_allclose(values(fn, range(6)), [0.0, 0.25, 0.5, 0.75, 1.0, 0.0], atol=1e-6)


def test_schedule_unknown_kind():
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.schedule(1.0, "exponential", 0, 10)


def test_make_optimizer_uses_schedule():
    tx, lr_fn = optim.make_optimizer(optim_cfg(lr=0.1, schedule="linear", warmup_steps=0), 4)
    np.testing.assert_allclose(values(lr_fn, range(5)), [0.1, 0.075, 0.05, 0.025, 0.0], atol=1e-7)
    # Adam's first update is -lr * sign(g) (bias-corrected m / sqrt(v)): the lr of step 0 is used.
    params = {"w": {"kernel": jnp.asarray([1.0, -1.0])}}
    grads = {"w": {"kernel": jnp.asarray([0.5, -2.0])}}
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]["kernel"]), [-0.1, 0.1], rtol=1e-5)
