"""Test setup: 8 simulated CPU devices, persistent compilation cache, tiny random HF models."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAXALIGN_TEST_CACHE", os.path.expanduser("~/.cache/jaxalign/jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """hf_model_dir(family, dtype="float32", seq_cls=False) -> directory of a saved tiny random HF model."""
    cache = {}

    def make(family, dtype="float32", seq_cls=False):
        key = (family, dtype, seq_cls)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"hf-{family}-{dtype}{'-cls' if seq_cls else ''}")
            hf_models.save_tiny(family, str(path), dtype=dtype, seq_cls=seq_cls)
            cache[key] = str(path)
        return cache[key]
    return make
