"""HF <-> jaxalign conversion: bit-exact round trips (every family, fp32 and bf16, Python API and CLI),
what transformers makes of the exports, sharded safetensors both ways, scalar heads, tokenizer files,
streaming host memory, one-line CLI errors on bad inputs, and atomic (all-or-nothing) exports."""
import json
import os
import shutil
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (bfloat16 for safetensors' numpy path)
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jaxalign
from jaxalign import JaxalignError
from jaxalign.convert import hf
from jaxalign.loading import from_config, from_pretrained
from jaxalign.models import ModelConfig
from jaxalign.parallel.mesh import make_mesh
from tests import hf_models

FAMILIES = list(hf_models.FAMILIES)
TOKENS = np.random.default_rng(0).integers(3, 128, size=(2, 12))  # no pad (0) ids; longer than the windows

COMMON_KEYS = ("model_type", "architectures", "dtype", "vocab_size", "tie_word_embeddings", "bos_token_id",
               "eos_token_id", "pad_token_id")
LLAMA_KEYS = COMMON_KEYS + ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                            "rope_parameters")
CONFIG_KEYS = {
    "llama2": LLAMA_KEYS + ("attention_bias", "mlp_bias"),
    "llama3": LLAMA_KEYS + ("attention_bias", "mlp_bias"),
    "llama_bias": LLAMA_KEYS + ("attention_bias", "mlp_bias"),
    "mistral": LLAMA_KEYS + ("sliding_window",),
    "qwen2": LLAMA_KEYS + ("use_sliding_window", "sliding_window", "layer_types"),
    "gpt2": COMMON_KEYS + ("n_embd", "n_layer", "n_head", "n_positions", "layer_norm_epsilon",
                           "activation_function"),
}


# ------------------------------------------------------------------------------------------ helpers

def read_tensors(d) -> dict:
    """Every tensor of an HF directory (single file, or all shards named by the index)."""
    d = str(d)
    index = os.path.join(d, hf.INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [hf.SINGLE]
    out = {}
    for fname in files:
        part = load_file(os.path.join(d, fname))
        assert not set(part) & set(out), f"{fname}: tensors stored twice"
        out.update(part)
    return out


def assert_bit_exact(original: dict, exported: dict):
    assert sorted(exported) == sorted(original)
    for name, a in original.items():
        b = exported[name]
        assert b.dtype == a.dtype, name
        assert b.shape == a.shape, name
        if a.dtype.itemsize == 2:  # bf16/fp16: compare the bit patterns
            assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), name
        assert a.tobytes() == b.tobytes(), name


def read_json(path):
    with open(path) as f:
        return json.load(f)


def assert_config_kept(family, original_dir, exported_dir):
    a = read_json(os.path.join(original_dir, "config.json"))
    b = read_json(os.path.join(exported_dir, "config.json"))
    for key in CONFIG_KEYS[family]:
        assert key in a, f"fixture config lacks {key}"
        assert key in b, f"exported config.json lacks {key}"
        assert b[key] == a[key], key


def torch_model(path, cls=transformers.AutoModelForCausalLM, check_keys=False):
    if not check_keys:
        return cls.from_pretrained(str(path)).eval()
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def torch_out(model):
    with torch.no_grad():
        return model(torch.as_tensor(TOKENS)).logits.float().numpy()


def assert_logits_equal(got, want, dtype="float32"):
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if dtype == "float32":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)


def jax_logits(lm):
    return np.asarray(lm(jnp.asarray(TOKENS)), dtype=np.float32)


def jax_scores(lm):
    """The scalar head at the last position (HF *ForSequenceClassification pools the last non-pad token)."""
    m = lm.module()
    return np.asarray(m.scores(m.hidden_states(jnp.asarray(TOKENS))))[:, -1]


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def copy_fixture(src, dst):
    """A private copy (the fixture directories are shared by the whole session and must stay pristine)."""
    shutil.copytree(src, dst)
    return dst


def add_tokenizer(hf_dir):
    """A tiny word-level tokenizer trained offline, saved the way transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world", "the quick brown fox jumps over the lazy dog", "hello jax"],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(hf_dir))
    return fast


def run_cli(*args, cwd):
    """`python -m jaxalign.cli convert ...` with the jaxalign this test process imported (first on the path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(jaxalign.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    return subprocess.run([sys.executable, "-m", "jaxalign.cli", "convert", *map(str, args)],
                          capture_output=True, text=True, cwd=str(cwd), env=env, timeout=300)


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_api_bit_exact(hf_model_dir, tmp_path, family, dtype):
    src = hf_model_dir(family, dtype=dtype)
    native, out = tmp_path / "native", tmp_path / "hf"
    # import onto an 8-device FSDP mesh, export from the default single device: sharding must not matter
    mesh = make_mesh((1, -1, 1)) if dtype == "float32" else None
    lm = from_pretrained(src, mesh=mesh)
    assert lm.config.param_dtype == dtype
    lm.save(str(native))
    assert (native / "jaxalign_config.json").is_file() and (native / "params").is_dir()
    from_pretrained(str(native)).save_pretrained(str(out))

    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_bit_exact(read_tensors(src), read_tensors(out))
    assert_config_kept(family, src, out)
    assert leftovers(tmp_path) == []
    assert (os.stat(out).st_mode & 0o777) == 0o777 & ~current_umask()  # not mkdtemp's private 0700

    exported = torch_model(out, check_keys=True)
    assert exported.dtype == getattr(torch, dtype)
    assert_logits_equal(torch_out(exported), torch_out(torch_model(src)), dtype)


def test_param_dtype_cast_matches_torch(hf_model_dir, tmp_path):
    """fp32 checkpoint loaded with param_dtype=bfloat16 exports what torch's .to(bfloat16) saved."""
    from_pretrained(hf_model_dir("llama3"), param_dtype=jnp.bfloat16).save_pretrained(str(tmp_path / "hf"))
    assert_bit_exact(read_tensors(hf_model_dir("llama3", dtype="bfloat16")), read_tensors(tmp_path / "hf"))
    assert read_json(tmp_path / "hf" / "config.json")["dtype"] == "bfloat16"


def test_roundtrip_cli_sharded_with_tokenizer(hf_model_dir, tmp_path):
    """CLI both ways (default mesh: FSDP over the 8 devices), sharded export, tokenizer carried along."""
    family, dtype = "llama3", "bfloat16"
    src = copy_fixture(hf_model_dir(family, dtype=dtype), tmp_path / "src")
    tok = add_tokenizer(src)
    native, out = tmp_path / "native", tmp_path / "hf"

    r = run_cli("--from-hf", src, "--out", native, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote jaxalign model" in r.stdout
    assert (native / "tokenizer.json").is_file() and (native / "tokenizer_config.json").is_file()
    assert read_json(native / "jaxalign_config.json")["param_dtype"] == dtype

    r = run_cli("--to-hf", native, "--out", out, "--max-shard-size", "50KB", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote HF checkpoint" in r.stdout
    assert leftovers(tmp_path) == []

    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 2 and not (out / hf.SINGLE).exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert_bit_exact(read_tensors(src), read_tensors(out))
    assert_config_kept(family, src, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    assert loaded("hello quick fox")["input_ids"] == tok("hello quick fox")["input_ids"]
    assert_logits_equal(torch_out(torch_model(out, check_keys=True)), torch_out(torch_model(src)), dtype)


def test_tokenizer_files_copied_api(hf_model_dir, tmp_path):
    src = copy_fixture(hf_model_dir("gpt2"), tmp_path / "src")
    tok = add_tokenizer(src)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(src))
    native, out = tmp_path / "native", tmp_path / "hf"
    from_pretrained(str(src)).save(str(native))
    from_pretrained(str(native)).save_pretrained(str(out))
    for d in (native, out):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (d / name).read_bytes() == (src / name).read_bytes(), (d, name)
    text = "the lazy dog says hello"
    for d in (native, out):
        assert transformers.AutoTokenizer.from_pretrained(str(d))(text)["input_ids"] == tok(text)["input_ids"]
    # an explicit tokenizer_dir wins over the source directory
    plain = tmp_path / "plain"
    from_pretrained(hf_model_dir("gpt2")).save_pretrained(str(plain), tokenizer_dir=str(src))
    assert (plain / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------------ sharding

def test_sharded_export_index(hf_model_dir, tmp_path):
    src = hf_model_dir("llama2")
    lm = from_pretrained(src)
    out = tmp_path / "hf"
    lm.save_pretrained(str(out), max_shard_size="50KB")

    index = read_json(out / hf.INDEX)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) >= 4
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    original = read_tensors(src)
    assert sorted(index["weight_map"]) == sorted(original)
    for fname in shards:  # every tensor is where the index says, and in no other shard
        assert all(index["weight_map"][n] == fname for n in load_file(str(out / fname)))
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in original.values())
    for fname in shards:  # no shard over the limit unless it holds a single tensor that is larger
        tensors = load_file(str(out / fname))
        assert len(tensors) == 1 or sum(a.nbytes for a in tensors.values()) <= 50_000
    assert_bit_exact(original, read_tensors(out))

    assert_logits_equal(torch_out(torch_model(out, check_keys=True)), torch_out(torch_model(src)))
    again = from_pretrained(str(out))  # our own sharded output reads back
    np.testing.assert_array_equal(jax_logits(again), jax_logits(lm))


def test_read_transformers_sharded_checkpoint(hf_model_dir, tmp_path):
    src = hf_model_dir("llama_bias")
    sharded = tmp_path / "sharded"
    model = torch_model(src)
    model.save_pretrained(str(sharded), max_shard_size="50KB")
    assert (sharded / hf.INDEX).is_file()
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    assert not (sharded / hf.SINGLE).exists()

    lm = from_pretrained(str(sharded))
    np.testing.assert_array_equal(jax_logits(lm), jax_logits(from_pretrained(src)))
    np.testing.assert_allclose(jax_logits(lm), torch_out(model), rtol=0, atol=1e-4)
    lm.save_pretrained(str(tmp_path / "hf"))
    assert_bit_exact(read_tensors(src), read_tensors(tmp_path / "hf"))


# ------------------------------------------------------------------------------------------ scalar head

def test_seq_cls_roundtrip(hf_model_dir, tmp_path):
    src = hf_model_dir("llama2", seq_cls=True)
    lm = from_pretrained(src)
    assert lm.config.num_labels == 1 and not lm.config.lm_head
    out = tmp_path / "hf"
    lm.save_pretrained(str(out))
    assert_bit_exact(read_tensors(src), read_tensors(out))
    config = read_json(out / "config.json")
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert len(config["id2label"]) == 1

    cls = transformers.AutoModelForSequenceClassification
    exported = torch_model(out, cls, check_keys=True)
    assert type(exported).__name__ == "LlamaForSequenceClassification"
    assert exported.config.num_labels == 1
    original = torch_model(src, cls)
    want = torch_out(original)[:, 0]
    assert_logits_equal(torch_out(exported)[:, 0], want)
    np.testing.assert_allclose(jax_scores(lm), want, rtol=0, atol=1e-4)


def test_add_scalar_head(hf_model_dir, tmp_path):
    src = hf_model_dir("llama2")
    lm = from_pretrained(src, num_labels=1)
    assert lm.config.num_labels == 1
    out = tmp_path / "hf"
    lm.save_pretrained(str(out))
    config = read_json(out / "config.json")
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    tensors = read_tensors(out)
    assert tensors["score.weight"].shape == (1, 64)
    original = read_tensors(src)
    del original["lm_head.weight"]  # *ForSequenceClassification has no LM head
    tensors_wo_score = {k: v for k, v in tensors.items() if k != "score.weight"}
    assert_bit_exact(original, tensors_wo_score)

    exported = torch_model(out, transformers.AutoModelForSequenceClassification, check_keys=True)
    assert exported.config.num_labels == 1
    np.testing.assert_array_equal(exported.score.weight.detach().numpy(), tensors["score.weight"])
    np.testing.assert_allclose(jax_scores(lm), torch_out(exported)[:, 0], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ streaming

def test_streaming_host_memory(tmp_path):
    cfg = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=8,
                      num_heads=4, num_kv_heads=4, head_dim=64)
    specs = hf.family("llama").hf_tensors(cfg)
    sizes = [int(np.prod(s.shape)) * 4 for s in specs]
    largest, total = max(sizes), sum(sizes)
    assert total > 20 * largest  # the bound below is meaningful only if the model is many tensors
    lm = from_config(cfg)
    # warm up (jit compilation and tracing allocate Python objects that are not about tensor data)
    lm.save_pretrained(str(tmp_path / "warm"))
    from_pretrained(str(tmp_path / "warm"))

    def peak(fn):
        """(peak, still allocated at the end) of what Python and numpy allocate while fn runs; fn's result."""
        tracemalloc.start()
        try:
            result = fn()
            current, top = tracemalloc.get_traced_memory()
            return top, current, result
        finally:
            tracemalloc.stop()

    out = str(tmp_path / "hf")
    save_peak, _, _ = peak(lambda: lm.save_pretrained(out))
    # On the CPU backend a param may alias the numpy buffer it was read into (zero-copy device_put), so
    # the load peak can include the 1 MiB embedding that stays alive as the parameter itself.
    load_peak, load_kept, loaded = peak(lambda: from_pretrained(out))
    # control: tracemalloc does see the numpy buffers safetensors hands out (reading everything at once)
    st = hf.SafetensorsDir(out)
    eager_peak, _, _ = peak(lambda: {n: st.get(n) for n in st.files})
    print(f"largest tensor {largest:,} B, model {total:,} B; peak host allocation: "
          f"save_pretrained {save_peak:,} B, from_pretrained {load_peak:,} B (still held after: {load_kept:,} B), "
          f"eager read of all tensors {eager_peak:,} B")
    assert eager_peak >= total
    assert save_peak < 3 * largest
    assert load_peak < 3 * largest
    assert max(save_peak, load_peak) < total / 5
    np.testing.assert_array_equal(np.asarray(loaded.params["layers"]["down"]["kernel"][...]),
                                  np.asarray(lm.params["layers"]["down"]["kernel"][...]))


# ------------------------------------------------------------------------------------------ bad inputs

def _unknown_model_type(src):
    c = read_json(src / "config.json")
    c["model_type"] = "falcon9"
    (src / "config.json").write_text(json.dumps(c))
    return "'falcon9'"


def _truncated(src):
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return str(path)


def _shape_mismatch(src):
    c = read_json(src / "config.json")
    c["intermediate_size"] = 80
    (src / "config.json").write_text(json.dumps(c))
    return "'model.layers.0.mlp.gate_proj.weight'"


def _missing_tensor(src):
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return "'model.layers.1.self_attn.k_proj.weight'"


def _missing_dir(src):
    shutil.rmtree(src)
    return str(src)


BAD_INPUTS = {"unknown_model_type": _unknown_model_type, "truncated": _truncated,
              "shape_mismatch": _shape_mismatch, "missing_tensor": _missing_tensor, "missing_dir": _missing_dir}


def assert_one_line_error(r, *names):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("jaxalign: error: "), r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_input(hf_model_dir, tmp_path, case):
    src = copy_fixture(hf_model_dir("llama2"), tmp_path / "src")
    named = BAD_INPUTS[case](src)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    r = run_cli("--from-hf", src, "--out", out, cwd=tmp_path)
    assert_one_line_error(r, named)
    assert not out.exists()
    assert os.listdir(work) == []


def test_cli_out_exists(hf_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("--from-hf", hf_model_dir("llama2"), "--out", out, cwd=tmp_path)
    assert_one_line_error(r, str(out), "--overwrite")
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ atomic exports

def _fail_after(monkeypatch, n):
    real, calls = hf._hf_array, []

    def flaky(spec, params):
        calls.append(spec.name)
        if len(calls) > n:
            raise RuntimeError("simulated failure while exporting")
        return real(spec, params)
    monkeypatch.setattr(hf, "_hf_array", flaky)
    return calls


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_failed_export_leaves_nothing(hf_model_dir, tmp_path, monkeypatch):
    lm = from_pretrained(hf_model_dir("mistral"))
    out = tmp_path / "hf"
    with monkeypatch.context() as m:
        calls = _fail_after(m, 5)  # the 6th tensor is in the middle of the second shard
        with pytest.raises(RuntimeError, match="simulated failure"):
            lm.save_pretrained(str(out), max_shard_size="50KB")
    assert len(calls) == 6
    assert not out.exists()
    assert leftovers(tmp_path) == [] and os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_old_dir(hf_model_dir, tmp_path, monkeypatch):
    lm = from_pretrained(hf_model_dir("qwen2"))
    out = tmp_path / "hf"
    lm.save_pretrained(str(out))
    before = snapshot(out)
    with pytest.raises(JaxalignError, match="already exists"):
        lm.save_pretrained(str(out))
    with monkeypatch.context() as m:
        _fail_after(m, 2)
        with pytest.raises(RuntimeError, match="simulated failure"):
            lm.save_pretrained(str(out), max_shard_size="50KB", overwrite=True)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []
    # a successful overwrite replaces the directory wholesale (no stale single file next to the shards)
    lm.save_pretrained(str(out), max_shard_size="50KB", overwrite=True)
    assert not (out / hf.SINGLE).exists() and (out / hf.INDEX).exists()
    assert_bit_exact(read_tensors(hf_model_dir("qwen2")), read_tensors(out))
    assert leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["hf"]


def test_failed_native_save_leaves_nothing(hf_model_dir, tmp_path, monkeypatch):
    from jaxalign import checkpoint

    lm = from_pretrained(hf_model_dir("gpt2"))
    out = tmp_path / "native"

    def broken(path, params):
        os.makedirs(path)
        with open(os.path.join(path, "partial"), "w") as f:
            f.write("x")
        raise RuntimeError("simulated failure while saving params")
    monkeypatch.setattr(checkpoint, "save_params", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        lm.save(str(out))
    assert not out.exists()
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ malformed checkpoints
# In-process (cli.main) to spare subprocess start-ups: the same code path minus the interpreter start.

def _index_not_json(d):
    (d / hf.INDEX).write_text("{not json")
    return str(d / hf.INDEX)


def _index_without_weight_map(d):
    (d / hf.INDEX).write_text(json.dumps({"metadata": {"total_size": 1}}))
    return str(d / hf.INDEX)


def _index_wrong_shard(d):
    index = read_json(d / hf.INDEX)
    index["weight_map"]["model.norm.weight"] = sorted(set(index["weight_map"].values()))[0]
    (d / hf.INDEX).write_text(json.dumps(index))
    return "'model.norm.weight'"


def _config_field_wrong_type(d):
    c = read_json(d / "config.json")
    c["hidden_size"] = "64"
    (d / "config.json").write_text(json.dumps(c))
    return "hidden_size"


def _native_config_not_json(d):
    (d / "jaxalign_config.json").write_text("{")
    return str(d / "jaxalign_config.json")


def _native_config_unknown_field(d):
    c = read_json(d / "jaxalign_config.json")
    c["foo"] = 1
    (d / "jaxalign_config.json").write_text(json.dumps(c))
    return "'foo'"


def _bug(fn, what):
    """A malformed input that once escaped as a traceback (`what`) instead of a one-line jaxalign error."""
    return pytest.param(fn, id=fn.__name__.strip("_"))


@pytest.mark.parametrize("corrupt", [
    _bug(_index_not_json, "JSONDecodeError from SafetensorsDir reading the index"),
    _bug(_index_without_weight_map, "KeyError('weight_map') from SafetensorsDir"),
    _bug(_index_wrong_shard, "SafetensorError from SafetensorsDir.shape (get_slice outside the try)"),
    _bug(_config_field_wrong_type, "TypeError from the model constructor (config field types unchecked)"),
    _bug(_native_config_not_json, "JSONDecodeError from loading.load_config"),
    _bug(_native_config_unknown_field, "ValueError from ModelConfig.from_dict"),
])
def test_cli_malformed_checkpoint(hf_model_dir, tmp_path, capsys, corrupt):
    from jaxalign import cli

    src = tmp_path / "src"
    if corrupt.__name__.startswith("_native"):
        from_pretrained(hf_model_dir("llama2")).save(str(src))
        direction = "--to-hf"
    elif corrupt.__name__.startswith("_index"):
        torch_model(hf_model_dir("llama2")).save_pretrained(str(src), max_shard_size="50KB")
        direction = "--from-hf"
    else:
        copy_fixture(hf_model_dir("llama2"), src)
        direction = "--from-hf"
    named = corrupt(src)
    capsys.readouterr()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", direction, str(src), "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("jaxalign: error: ") and named in lines[0], lines
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_native_params_disagree_with_config(hf_model_dir, tmp_path):
    """A subprocess: the failed Orbax restore leaves reads in flight that complain at interpreter exit."""
    src = tmp_path / "native"
    from_pretrained(hf_model_dir("llama2")).save(str(src))
    c = read_json(src / "jaxalign_config.json")
    c["intermediate_size"] = 80
    (src / "jaxalign_config.json").write_text(json.dumps(c))
    out = tmp_path / "out"
    r = run_cli("--to-hf", src, "--out", out, cwd=tmp_path)
    assert_one_line_error(r, str(src))
    assert not out.exists() and leftovers(tmp_path) == []
