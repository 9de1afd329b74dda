"""Tiny offline tokenizers for data tests: a byte-level BPE trained in-process on a fixed corpus."""
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "What is two plus two? Four.", "Name a color. Blue.", "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog.", "Sort the list 3 1 2: 1 2 3.",
    "user assistant system: answer the question briefly.", "Yes. No. Maybe. Thanks!",
] * 20
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(path: str, chat_template=None, eos="</s>", bos=None, vocab_size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos,
                                   bos_token=bos or "<s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        fast.chat_template = chat_template
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    return path


def write_jsonl(path, records):
    """Records as a JSON Lines file (a str record is written as-is: malformed lines for error tests);
    creates the parent directory; returns the path as a string."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)
