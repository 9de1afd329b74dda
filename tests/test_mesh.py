"""Device mesh construction, logical-axis rules, sharded loading/initialisation and batch placement, on the
8 simulated CPU devices conftest sets up."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxalign.models as models
from jaxalign import loading
from jaxalign.models.presets import get_preset
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.parallel.mesh import logical_to_spec, make_mesh, param_shardings, shard_batch

MESH_SHAPES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def sizes(mesh):
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def mesh_for(shape):
    return make_mesh(shape, jax.devices()[:1]) if shape == (1, 1, 1) else make_mesh(shape)


def test_eight_devices():
    assert len(jax.devices()) == 8


# ------------------------------------------------------------------------------------ make_mesh

def test_make_mesh_shapes():
    assert sizes(make_mesh((-1, 1, 1))) == {"data": 8, "fsdp": 1, "model": 1}
    assert sizes(make_mesh((1, -1, 2))) == {"data": 1, "fsdp": 4, "model": 2}
    assert sizes(make_mesh((2, 2, 2))) == {"data": 2, "fsdp": 2, "model": 2}
    assert sizes(make_mesh((1, 4, 2))) == {"data": 1, "fsdp": 4, "model": 2}
    one = make_mesh((1, 1, 1), jax.devices()[:1])
    assert sizes(one) == {"data": 1, "fsdp": 1, "model": 1} and one.devices.size == 1
    assert set(make_mesh((2, 2, 2)).devices.flat) == set(jax.devices())


@pytest.mark.parametrize("shape", [(2, 2, 1), (3, 1, 1), (16, 1, 1), (-1, 3, 1), (-1, -1, 1), (8, 1)])
def test_make_mesh_rejects_bad_shapes(shape):
    with pytest.raises(ValueError):
        make_mesh(shape)


# ------------------------------------------------------------------------------------ logical_to_spec

def test_logical_to_spec_without_mesh():
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "model", None)
    assert logical_to_spec(("vocab", "embed")) == P("model", "fsdp")
    assert logical_to_spec(("act_batch", None)) == P(("data", "fsdp"), None)


def test_logical_to_spec_drops_non_dividing_axes():
    mesh = make_mesh((1, 2, 4))
    # 2 kv heads cannot be split over model=4: replicated on that axis; 4 query heads can.
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh) == \
        P(None, "fsdp", None, None)
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == \
        P(None, "fsdp", "model", None)
    # embed 63 is not divisible by fsdp=2.
    assert logical_to_spec(("vocab", "embed"), (128, 63), mesh) == P("model", None)
    # A multi-axis target keeps the prefix that divides: batch 2 over data=2 x fsdp=2 keeps data only.
    mesh = make_mesh((2, 2, 2))
    assert logical_to_spec(("act_batch", None), (8, 12), mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("act_batch", None), (2, 12), mesh) == P("data", None)
    assert logical_to_spec(("act_batch", None), (3, 12), mesh) == P(None, None)


def test_logical_to_spec_does_not_reuse_a_mesh_axis():
    mesh = make_mesh((2, 2, 2))
    # act_batch takes fsdp, so embed (-> fsdp) stays unsharded.
    assert logical_to_spec(("act_batch", "embed"), (8, 64), mesh) == P(("data", "fsdp"), None)
    rules = (("vocab", "model"), ("embed", "model"))
    assert logical_to_spec(("vocab", "embed"), (128, 64), mesh, rules) == P("model", None)
    assert logical_to_spec(("embed", "vocab"), (64, 128), mesh, rules) == P("model", None)


# ------------------------------------------------------------------------------------ sharded models

def batch_of_8(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 128, size=(8, 12)).astype(np.int32)
    mask = np.ones((8, 12), np.int32)
    mask[1, :4] = 0   # left padding
    mask[3, 9:] = 0   # right padding
    mask[6, :2] = 0
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_same_logits_on_every_mesh(family, hf_model_dir):
    path = hf_model_dir(family)
    ids, mask = batch_of_8()
    outs = {}
    for shape in MESH_SHAPES:
        lm = loading.from_pretrained(path, mesh=mesh_for(shape), log=lambda *a: None)
        out = lm(ids, mask)
        assert out.shape == (8, 12, 128)
        outs[shape] = np.asarray(out)
        if shape == (1, 4, 2):
            q = lm.pure_params()["layers"]["q"]["kernel"]
            assert q.sharding.spec == P(None, "fsdp", "model", None)
            assert q.addressable_shards[0].data.shape == (2, 16, 2, 16) and q.shape == (2, 64, 4, 16)
            # The logits come back batch-sharded (act_batch -> data x fsdp: 8 rows over fsdp=4).
            assert {s.data.shape[0] for s in out.addressable_shards} == {2}
    ref = outs[(1, 1, 1)]
    real = mask == 1
    for shape, out in outs.items():
        diff = np.abs(out - ref)[real].max()
        assert diff <= 1e-5, (shape, diff)


def test_from_config_params_follow_param_shardings():
    shape = (1, 4, 2)
    cfg = get_preset("tiny").replace(tie_word_embeddings=False, num_labels=1, qkv_bias=True)
    mesh = make_mesh(shape)
    lm = loading.from_config(cfg, mesh)
    _, abstract = models.abstract_params(cfg)
    expected = jax.tree.leaves(param_shardings(abstract, mesh))
    actual = jax.tree.leaves(lm.pure_params())
    assert len(actual) == len(expected) > 10
    specs = []
    for a, s in zip(actual, expected):
        assert isinstance(s, NamedSharding)
        assert a.sharding == s, (a.shape, a.sharding, s)
        specs.append(s.spec)
    # Something is actually split over both fsdp and model.
    flat = {ax for spec in specs for entry in spec if entry for ax in ((entry,) if isinstance(entry, str) else entry)}
    assert {"fsdp", "model"} <= flat
    # The layout is the one logical_to_spec gives from each param's logical axes.
    params = lm.pure_params()
    assert params["embed"].sharding.spec == P("model", "fsdp")
    assert params["layers"]["k"]["kernel"].sharding.spec == P(None, "fsdp", "model", None)
    assert params["layers"]["down"]["kernel"].sharding.spec == P(None, "model", "fsdp")
    assert params["score"]["kernel"].sharding.spec == P("fsdp", None)
    # And the randomly initialised model runs on that mesh.
    ids, mask = batch_of_8()
    assert np.isfinite(np.asarray(lm(ids, mask))).all()


def test_param_shardings_keep_variable_structure():
    cfg = get_preset("tiny")
    mesh = make_mesh((1, 4, 2))
    _, abstract = models.abstract_params(cfg)
    shardings = param_shardings(abstract, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)


# ------------------------------------------------------------------------------------ shard_batch

@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_shard_batch(shape):
    mesh = make_mesh(shape)
    ids, mask = batch_of_8()
    batch = shard_batch({"input_ids": ids, "attention_mask": mask}, mesh)
    n_shards = sizes(mesh)["data"] * sizes(mesh)["fsdp"]
    for name, host in (("input_ids", ids), ("attention_mask", mask)):
        arr = batch[name]
        assert arr.shape == host.shape and arr.dtype == host.dtype
        assert arr.sharding.spec[0] == ("data", "fsdp")
        assert all(s is None for s in arr.sharding.spec[1:])
        np.testing.assert_array_equal(np.asarray(arr), host)
        assert len(arr.addressable_shards) == 8
        for shard in arr.addressable_shards:
            assert shard.data.shape == (8 // n_shards, 12)
            np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
    assert batch["input_ids"].sharding == mesh_lib.batch_sharding(mesh, 2, shape=(8, 12))
    # A batch the data x fsdp product does not divide is not split (rather than failing).
    odd = shard_batch(ids[:3], mesh)
    assert {s.data.shape for s in odd.addressable_shards} == {(3, 12)}
    np.testing.assert_array_equal(np.asarray(odd), ids[:3])
