"""Loss building blocks and the optimizer against independent NumPy re-implementations: chunked token
log-probs (values, gradients, stats), the SFT loss, sequence log-probs, weight-decay masking and the
learning-rate schedules."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxalign.losses import sequence_logprobs, sft_loss, shift, token_logprobs
from jaxalign.train import optim

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
