"""Batch prediction (`jaxalign sample`) and an interactive chat (`jaxalign chat`) over the sampler.

`predict_file` reads prompt records (`{"prompt": ...}` or `{"messages": [...]}`, as GRPO's prompt data:
a final assistant turn is dropped and generated afresh), renders them with the model's chat template and
appends one JSON line per (prompt, sample) to OUT: the record's other fields, then `index`, `sample`,
`completion`, `finish_reason` ("stop" | "length"), `num_tokens`. It is resumable: rows already in OUT are
skipped (a torn last line from a kill is cut off), and each row's randomness is keyed by (seed, index,
sample), so a resumed file equals an uninterrupted one.
"""
import json
import os
import time
from typing import Iterable, Optional

import jax
import numpy as np

from jaxalign import JaxalignError, loading
from jaxalign.data import formats, templates
from jaxalign.parallel.mesh import make_mesh
from jaxalign.sampling.sampler import completions, generate, left_pad

PROMPT_BUCKET = 32  # prompt lengths are rounded up to a multiple of this: few compiled shapes


def load(model_dir: str, chat_template: Optional[str] = None, mesh_shape=(1, -1, 1), adapter: Optional[str] = None):
    """(lm, tokenizer, renderer) of a model directory (HF, jaxalign, or a training run), with an optional PEFT
    LoRA adapter merged in."""
    lm = loading.from_pretrained(model_dir, mesh=make_mesh(mesh_shape), adapter=adapter)
    if not lm.config.lm_head:
        raise JaxalignError(f"{model_dir}: a reward/value model (no LM head) cannot generate")
    tok = templates.load_tokenizer(model_dir, chat_template)
    return lm, tok, templates.Renderer(tok)


def with_tokenizer_eos(gen: dict, renderer) -> dict:
    """Stop on the tokenizer's EOS (what the training data ended replies with) as well as the model's."""
    extra = tuple(gen.get("stop_token_ids") or ()) + ((renderer.eos_id,) if renderer.eos_id is not None else ())
    return {**gen, "stop_token_ids": extra}


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def done_rows(out_path: str) -> set:
    """(index, sample) pairs already written to OUT; a torn final line (a killed run) is truncated away."""
    done = set()
    if not os.path.exists(out_path):
        return done
    good = 0
    with open(out_path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
                done.add((int(row["index"]), int(row.get("sample", 0))))
            except (ValueError, KeyError, TypeError):
                if line.endswith(b"\n"):
                    raise JaxalignError(f"{out_path}: line {len(done) + 1} is not a row this command wrote; "
                                        "pass another --out") from None
                break  # the torn tail of an interrupted write
            good += len(line)
    if good != os.path.getsize(out_path):
        with open(out_path, "r+b") as f:
            f.truncate(good)
    return done


class Written(int):
    """The rows `predict_file` wrote (an int), with the tokens it generated and the seconds that took."""
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def batch_rows(batch_size: int, todo: int) -> int:
    """The padded batch: --batch-size, or all the rows to do when there are fewer (no compute on padding)."""
    return max(1, min(batch_size, todo))


def predict_file(model_dir: str, prompts_path: str, out_path: str, *, batch_size: int = 32,
                 num_samples: int = 1, chat_template: Optional[str] = None, mesh_shape=(1, -1, 1),
                 progress: bool = True, log=print, adapter: Optional[str] = None, **gen) -> Written:
    """Generate completions for every prompt record of `prompts_path` into `out_path`; returns rows written
    (a `Written`: also the tokens generated and the seconds generation took)."""
    if not os.path.exists(prompts_path):
        raise JaxalignError(f"{prompts_path}: prompts file not found")
    lm, tok, renderer = load(model_dir, chat_template, mesh_shape, adapter)
    gen = with_tokenizer_eos(gen, renderer)
    todo = []
    done = done_rows(out_path)
    for i, rec in enumerate(formats.read_records(prompts_path)):
        ex = formats.normalize(rec, "prompt")
        ids = renderer.prompt(ex["prompt"], rec.where)
        if len(ids) + gen["max_new_tokens"] > lm.config.max_position_embeddings:
            raise JaxalignError(f"{rec.where}: prompt of {len(ids)} tokens + max_new_tokens "
                                f"{gen['max_new_tokens']} exceeds the model's {lm.config.max_position_embeddings} "
                                "positions")
        for j in range(num_samples):
            if (i, j) not in done:
                todo.append((i, j, ids, json.loads(ex["extra"])))
    if done:
        log(f"{out_path}: {len(done)} rows already there, {len(todo)} to go")
    from tqdm import tqdm
    bar = tqdm(total=len(todo), disable=not progress, unit="row", dynamic_ncols=True)
    written, tokens, t0 = 0, 0, time.time()
    batch_size = batch_rows(batch_size, len(todo))
    with open(out_path, "a") as out:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            prompts = [c[2] for c in chunk]
            # pad the batch to a fixed size (and prompt length to a bucket): one compile for the whole file
            rows = prompts + [prompts[0]] * (batch_size - len(prompts))
            ids, mask = left_pad(rows, renderer.pad_id, PROMPT_BUCKET)
            row_ids = [i * num_samples + j for i, j, _, _ in chunk] + [0] * (batch_size - len(chunk))
            res = generate(lm, ids, mask, row_ids=row_ids, **gen)
            texts = completions(res)
            eos = np.asarray(jax.device_get(res.stopped_on_eos))
            for k, (i, j, _, extra) in enumerate(chunk):
                row = {**extra, "index": i, "sample": j, "completion": decode(tok, texts[k]),
                       "finish_reason": "stop" if eos[k] else "length", "num_tokens": len(texts[k]) + int(eos[k])}
                out.write(json.dumps(row) + "\n")
                tokens += row["num_tokens"]
            out.flush()
            os.fsync(out.fileno())
            written += len(chunk)
            bar.update(len(chunk))
    bar.close()
    result = Written(written)
    result.tokens, result.seconds = tokens, time.time() - t0
    return result


def chat(model_dir: str, *, system: Optional[str] = None, chat_template: Optional[str] = None,
         mesh_shape=(1, -1, 1), lines: Optional[Iterable[str]] = None, write=print, seed: int = 0,
         adapter: Optional[str] = None, **gen):
    """A terminal chat: each line is a user turn (`/reset` clears the history, `/exit` or EOF ends); each reply
    is followed by a line "(N tokens, R tok/s)" (R counts compilation on the first turn and on new lengths)."""
    lm, tok, renderer = load(model_dir, chat_template, mesh_shape, adapter)
    gen = with_tokenizer_eos(gen, renderer)
    history = [{"role": "system", "content": system}] if system else []
    start = list(history)
    if lines is None:
        lines = _stdin_lines()
    turn = 0
    for line in lines:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            write("(history cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = renderer.prompt(history, "chat")
        ids_np, mask = left_pad([ids], renderer.pad_id, PROMPT_BUCKET)
        t0 = time.time()
        res = generate(lm, ids_np, mask, seed=seed + turn, **gen)
        new = completions(res)[0]
        seconds = time.time() - t0
        n = len(new) + int(np.asarray(jax.device_get(res.stopped_on_eos))[0])
        reply = decode(tok, new).strip()
        history.append({"role": "assistant", "content": reply})
        write(reply)
        write(f"({n} tokens, {n / seconds if seconds > 0 else 0.0:.1f} tok/s)")
        turn += 1
    return history


def _stdin_lines():
    while True:
        try:
            yield input("> ")
        except EOFError:
            return
