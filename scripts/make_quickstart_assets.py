"""Build the quickstart's bundled data and tokenizer (jaxalign/assets/quickstart/), deterministically.

The task: sort a list of 3-6 digits ("sort: 7 2 9 4" -> "2 4 7 9"). Success is measurable (exact match
on held-out lists) and later stages reuse it: preference pairs (a correct vs a wrong sort) for RM/DPO, and a
verifiable reward for GRPO/PPO. The tokenizer is a byte-level BPE trained on this text, with digits split
one per token and a chatml chat template.

Run: python scripts/make_quickstart_assets.py
"""
import json
import os
import random

OUT = os.path.join(os.path.dirname(__file__), "..", "jaxalign", "assets", "quickstart")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROSE = ("jaxalign trains small and large language models to follow instructions. This bundled task asks the "
         "model to sort a short list of digits in ascending order, and checks the answer exactly.")


def problem(rng):
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return " ".join(map(str, digits)), " ".join(map(str, sorted(digits)))


def wrong_answer(rng, digits):
    """A plausible mistake: two neighbours swapped, a digit dropped, repeated or changed."""
    out = sorted(digits)
    while out == sorted(digits):
        out = sorted(digits)
        kind = rng.choice(["swap", "drop", "repeat", "change"])
        i = rng.randrange(len(out))
        if kind == "swap" and len(out) > 1:
            j = min(i, len(out) - 2)
            out[j], out[j + 1] = out[j + 1], out[j]
        elif kind == "drop":
            del out[i]
        elif kind == "repeat":
            out.insert(i, out[i])
        else:
            out[i] = rng.randint(0, 9)
    return " ".join(map(str, out))


def preference(rng, question):
    digits = [int(x) for x in question.split()]
    return {"prompt": [{"role": "user", "content": f"sort: {question}"}],
            "chosen": [{"role": "assistant", "content": " ".join(map(str, sorted(digits)))}],
            "rejected": [{"role": "assistant", "content": wrong_answer(rng, digits)}]}


def conversation(question, answer):
    return {"messages": [{"role": "user", "content": f"sort: {question}"},
                         {"role": "assistant", "content": answer}]}


def build_tokenizer(texts, path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(path)


def main():
    rng = random.Random(0)
    os.makedirs(OUT, exist_ok=True)
    seen, splits = set(), {"sft_train": 4000, "sft_eval": 200}
    rows = {}
    for name, n in (("sft_eval", splits["sft_eval"]), ("sft_train", splits["sft_train"])):
        rows[name] = []
        while len(rows[name]) < n:
            q, a = problem(rng)
            if name == "sft_eval":
                if q in seen:
                    continue
                seen.add(q)
            elif q in seen:  # held-out lists never appear in training
                continue
            rows[name].append(conversation(q, a))
    for name, items in rows.items():
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            for r in items:
                f.write(json.dumps(r) + "\n")
    # Preference pairs (RM, DPO): train on the SFT training lists, hold out the SFT eval lists.
    for name, source in (("pref_train", rows["sft_train"][:2000]), ("pref_eval", rows["sft_eval"])):
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            for r in source:
                q = r["messages"][0]["content"].removeprefix("sort: ")
                f.write(json.dumps(preference(rng, q)) + "\n")
    texts = [PROSE] + [m["content"] for r in rows["sft_train"] for m in r["messages"]]
    build_tokenizer(texts, OUT)
    print("wrote", os.path.abspath(OUT), {k: len(v) for k, v in rows.items()})


if __name__ == "__main__":
    main()
