"""Reward functions the GRPO tests name in their configs (tests.grpo_rewards:<function>)."""


def e_fraction(prompts, completions, **_):
    """Share of the completion's characters that are 'e' (learnable from a random model: many BPE tokens
    of the test tokenizer contain an 'e')."""
    return [c.count("e") / max(len(c), 1) for c in completions]


def answer_length(prompts, completions, answer, **_):
    """Depends on the record's extra field only: each completion of a prompt gets len(answer)."""
    assert len(answer) == len(completions) == len(prompts)
    return [float(len(a)) for a in answer]


def unscorable(prompts, completions, **_):
    return [None] * len(completions)


def half_scorable(prompts, completions, **_):
    """1 + the completion's length on even rows, None (cannot score) on odd rows."""
    return [None if i % 2 else 1.0 + len(c) for i, c in enumerate(completions)]
