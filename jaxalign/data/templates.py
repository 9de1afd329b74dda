"""Chat templates and tokenisation with exact loss masks.

A conversation is rendered with the chat template one message at a time, and cut into pieces at the
message boundaries: the text before each assistant reply (including the generation prompt) and the reply
itself (through the template's end-of-turn). Each piece is tokenised on its own and the ids concatenated.
A prompt therefore has the same ids however it is continued: chosen and rejected share the prompt ids
exactly, and they are the ids the sampler is given. Loss masks cover the assistant pieces only, every
assistant turn of a multi-turn conversation. The final reply gets EOS appended unless it already holds it.
"""
import os
from typing import Optional

from jaxalign import JaxalignError
from jaxalign.data.formats import DataError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Plain concatenation: for base models and raw-text tasks (prompt + completion + EOS).
RAW = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
BUILTIN_TEMPLATES = {"chatml": CHATML, "raw": RAW}


def load_tokenizer(path: str, chat_template: Optional[str] = None):
    """An HF tokenizer from a local directory (tokenizer.json or a SentencePiece .model), never remote
    code, with its chat template resolved: `chat_template` (a built-in name, a .jinja file or a template
    string) > the tokenizer's own > the built-in chatml."""
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise JaxalignError(f"{path}: tokenizer directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise JaxalignError(f"{path}: cannot load tokenizer ({e})") from None
    tok.chat_template = resolve_template(chat_template, tok.chat_template)
    return tok


def resolve_template(spec: Optional[str], own: Optional[str]) -> str:
    if spec:
        if spec in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[spec]
        if spec.endswith(".jinja"):
            if not os.path.isfile(spec):
                raise JaxalignError(f"chat template file {spec!r}: not found")
            with open(spec) as f:
                return f.read()
        if "{%" in spec or "{{" in spec:
            return spec
        raise JaxalignError(f"chat_template {spec!r}: not a built-in ({', '.join(BUILTIN_TEMPLATES)}), "
                            f"a .jinja file or a template")
    return own if isinstance(own, str) and own else CHATML


class Renderer:
    """Tokenises normalised examples (formats.py) into id lists and masks for one tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        # Tokenizers that add BOS themselves (Llama 2 style) expect it at the start of every sequence.
        self.add_bos = self.bos_id is not None and probe[:1] == [self.bos_id]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def pieces(self, messages, where: str, generation_prompt_at_end: bool = False):
        """[(text, is_assistant)] covering the rendered conversation, cut at message boundaries."""
        out, prev = [], ""

        def add(text, assistant):
            if not text.startswith(prev):
                raise DataError(f"{where}: the chat template does not render this conversation "
                                f"prefix-consistently; set tokenizer.chat_template")
            out.append((text[len(prev):], assistant))
            return text

        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                prev = add(self._render(messages[:k], True) if k else "", False)
                prev = add(self._render(messages[:k + 1], False), True)
            else:
                prev = add(self._render(messages[:k + 1], False), False)
        if generation_prompt_at_end:
            add(self._render(messages, True), False)
        return [(t, a) for t, a in out if t]

    def encode(self, pieces) -> tuple:
        """(ids, mask): pieces tokenised one by one; assistant pieces masked 1. The final assistant piece
        is closed by EOS when the template did not write one (earlier turns keep the template's text)."""
        ids, mask = ([self.bos_id], [0]) if self.add_bos else ([], [])
        texts = [t for t, _ in pieces]
        encoded = self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        last = max((i for i, (_, a) in enumerate(pieces) if a), default=-1)
        for i, ((_, assistant), piece) in enumerate(zip(pieces, encoded)):
            if i == last and self.eos_id is not None and self.eos_id not in piece:
                piece = piece + [self.eos_id]
            if i == 0 and self.add_bos and piece[:1] == [self.bos_id]:
                piece = piece[1:]  # the template wrote BOS itself
            ids += piece
            mask += [int(assistant)] * len(piece)
        return ids, mask

    def conversation(self, messages, where):
        return self.encode(self.pieces(messages, where))

    def prompt_and_completion(self, prompt, completion, where):
        """prompt ids (all prompt turns, through the generation prompt: what the sampler is given) and
        completion ids (through EOS), tokenised apart."""
        prompt_pieces = [(t, False) for t, _ in self.pieces(prompt, where, generation_prompt_at_end=True)]
        full = self.pieces(prompt + completion, where)
        cut, n = 0, sum(len(t) for t, _ in prompt_pieces)
        while n > 0 and cut < len(full):
            n -= len(full[cut][0])
            cut += 1
        if n != 0 or not any(a for _, a in full[cut:]):
            raise DataError(f"{where}: the chat template renders the prompt differently when a completion "
                            f"follows; set tokenizer.chat_template")
        prompt_ids, _ = self.encode(prompt_pieces)
        saved, self.add_bos = self.add_bos, False
        try:
            completion_ids, completion_mask = self.encode(full[cut:])
        finally:
            self.add_bos = saved
        return prompt_ids, completion_ids, completion_mask

    def prompt(self, messages, where):
        ids, _ = self.encode(self.pieces(messages, where, generation_prompt_at_end=True))
        return ids
