"""jaxalign: align language models in JAX (SFT, reward models, PPO, DPO family, GRPO/RLOO)."""
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors' numpy path is used)

__version__ = "0.1.0"


class JaxalignError(Exception):
    """A problem with the user's input (files, configs, checkpoints): the CLI prints it on one line."""
