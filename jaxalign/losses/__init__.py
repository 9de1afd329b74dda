"""Loss functions: arrays in, (loss, metrics) out, all pure.

Each loss has a per-example form the trainers use (summed with the examples' weights over micro-batches and
devices): `*_losses` for the preference and reward losses (per-example losses and metrics), `sft_sums` and
`policy_loss_sums` ((sum, denominator, metrics)), the `*_terms` per-token forms with `aggregate`. The public
`*_loss` functions are the batch means of those same outputs.
"""
from jaxalign.losses.logprobs import masked_sum, sequence_logprobs, shift, token_logprobs
from jaxalign.losses.policy import (AGGREGATIONS, ESTIMATORS, SCALES, aggregate, gae, group_advantages,
                                    kl_penalty, policy_loss, policy_loss_sums, policy_loss_terms, value_loss,
                                    value_loss_terms, whiten)
from jaxalign.losses.preference import (DPO_LOSS_TYPES, cpo_loss, cpo_losses, dpo_loss, dpo_losses,
                                        dpo_pair_metrics, dpo_type_losses, kto_kl, kto_loss, kto_losses, log1mexp,
                                        mean_token_nll, orpo_log_odds, orpo_loss, orpo_losses, simpo_loss,
                                        simpo_losses)
from jaxalign.losses.reduce import mean_loss, mean_metrics, weighted_sums
from jaxalign.losses.reward import reward_loss, reward_losses
from jaxalign.losses.sft import sft_loss, sft_sums

__all__ = [
    # log-probs
    "masked_sum", "sequence_logprobs", "shift", "token_logprobs",
    # SFT and reward model
    "sft_loss", "sft_sums", "reward_loss", "reward_losses",
    # preference
    "DPO_LOSS_TYPES", "cpo_loss", "cpo_losses", "dpo_loss", "dpo_losses", "dpo_pair_metrics", "dpo_type_losses",
    "kto_kl", "kto_loss", "kto_losses", "log1mexp", "mean_token_nll", "orpo_log_odds", "orpo_loss", "orpo_losses",
    "simpo_loss", "simpo_losses",
    # online RL
    "AGGREGATIONS", "ESTIMATORS", "SCALES", "aggregate", "gae", "group_advantages", "kl_penalty", "policy_loss",
    "policy_loss_sums", "policy_loss_terms", "value_loss", "value_loss_terms", "whiten",
    # reductions of per-example metrics
    "mean_loss", "mean_metrics", "weighted_sums",
]
