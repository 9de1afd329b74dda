"""Loss functions: arrays in, (loss, metrics) out, all pure (DESIGN.md §4)."""
from jaxalign.losses.logprobs import sequence_logprobs, shift, token_logprobs
from jaxalign.losses.sft import sft_loss

__all__ = ["sequence_logprobs", "shift", "sft_loss", "token_logprobs"]
