"""Loss functions: arrays in, (loss, metrics) out, all pure (DESIGN.md §4)."""
from jaxalign.losses.logprobs import sequence_logprobs, shift, token_logprobs
from jaxalign.losses.preference import (DPO_LOSS_TYPES, cpo_loss, dpo_loss, kto_kl, kto_loss, orpo_loss,
                                        simpo_loss)
from jaxalign.losses.reward import reward_loss
from jaxalign.losses.sft import sft_loss

__all__ = ["DPO_LOSS_TYPES", "cpo_loss", "dpo_loss", "kto_kl", "kto_loss", "orpo_loss", "reward_loss",
           "sequence_logprobs", "shift", "sft_loss", "simpo_loss", "token_logprobs"]
