"""The JAX sampler (docs/DESIGN.md §2): KV-cache generation for rollouts, `jaxalign sample` and chat.

    out = jaxalign.sampling.generate(lm, input_ids, attention_mask, max_new_tokens=64, temperature=0.7)
    out.tokens [B, N]  out.lengths [B]  out.stopped_on_eos [B]  out.logprobs [B, N]  out.truncated [B]
"""
from jaxalign.sampling.sampler import (SampleOutput, SamplingParams, completions, generate, left_pad, sample,
                                       stop_ids)

__all__ = ["SampleOutput", "SamplingParams", "completions", "generate", "left_pad", "sample", "stop_ids"]
