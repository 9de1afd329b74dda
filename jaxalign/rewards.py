"""Reward functions for GRPO (and the loader for user ones named in a config as `module:function`).

A reward function takes the batch's prompts (message lists), completions (strings) and each extra field
of the prompt records as a keyword argument (lists aligned with the completions), and returns a list of
floats (None = cannot score, the completion gets advantage 0), as TRL's reward functions.
"""
import importlib
import importlib.util
import os
import re

from jaxalign import JaxalignError


def exact_match(prompts, completions, answer=None, **_):
    """1.0 when the completion (stripped) equals the record's `answer`, else 0.0."""
    if answer is None:
        raise JaxalignError("reward exact_match needs an 'answer' field in the prompt records")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def sorted_digits(prompts, completions, **_):
    """The quickstart task's verifier: 1.0 for the sorted digits of the prompt 'sort: d d d', else 0.0
    (no answer field needed: the prompt itself says what is correct)."""
    out = []
    for p, c in zip(prompts, completions):
        text = p[-1]["content"] if isinstance(p, list) else str(p)
        digits = re.findall(r"\d", text.split(":", 1)[-1])
        out.append(float(c.split() == sorted(digits)))
    return out


def load_reward_funcs(spec: str, weights: str = "", required: bool = True, section: str = "grpo") -> list:
    """[(name, function, weight)] from 'module:function,path/file.py:function' and '1.0,0.5'."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names and required:
        raise JaxalignError(f"{section}.reward_funcs is empty: name at least one reward function (module:function) "
                            f"or a {section}.reward_model")
    ws = [float(w) for w in str(weights).split(",") if w.strip()] or [1.0] * len(names)
    if len(ws) != len(names):
        raise JaxalignError(f"{section}.reward_weights has {len(ws)} entries for {len(names)} reward functions")
    out = []
    for name, w in zip(names, ws):
        module, _, attr = name.rpartition(":")
        if not module or not attr:
            raise JaxalignError(f"reward function {name!r}: expected module:function or file.py:function")
        try:
            if module.endswith(".py"):
                if not os.path.isfile(module):
                    raise JaxalignError(f"reward function {name!r}: {module} not found")
                spec_ = importlib.util.spec_from_file_location(os.path.basename(module)[:-3], module)
                mod = importlib.util.module_from_spec(spec_)
                spec_.loader.exec_module(mod)
            else:
                mod = importlib.import_module(module)
        except ImportError as e:
            raise JaxalignError(f"reward function {name!r}: cannot import {module} ({e})") from None
        fn = getattr(mod, attr, None)
        if not callable(fn):
            raise JaxalignError(f"reward function {name!r}: {module} has no function {attr!r}")
        out.append((attr, fn, w))
    return out
