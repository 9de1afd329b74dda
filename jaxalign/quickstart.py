"""`jaxalign quickstart`: the bundled end-to-end demo, no arguments, a fresh machine, a few minutes on CPU.

Stage 1 (SFT): a tiny LLaMA, from scratch, learns to sort digits; prints held-out exact match before and
after, and greedy samples. Stage 2 (RM): a reward model from it learns to tell a correct sort from a
mistake; prints held-out pair accuracy before and after. Later stages (DPO, PPO, GRPO) start from stage 1.
"""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxalign
from jaxalign.models.layers import KVCache

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(jaxalign.__file__))), "configs",
                       "quickstart")
MARKER = ".jaxalign-quickstart"


def generate(model_cfg, graphdef, params, prompt_ids: list, eos_id: int, max_new_tokens: int = 16,
             temperature: float = 0.0, seed: int = 0, batch_size: int = 512) -> list:
    """Completions (token lists, EOS excluded) of prompts with the KV cache: greedy at temperature 0,
    else sampled. A small stand-in until jaxalign.sampling exists."""
    @jax.jit
    def step(params, tokens, mask, cache, key):
        logits, cache = nnx.merge(graphdef, params)(tokens, mask, cache=cache)
        last = logits[:, -1].astype(jnp.float32)
        if temperature > 0:
            return jax.random.categorical(key, last / temperature).astype(jnp.int32), cache
        return jnp.argmax(last, axis=-1).astype(jnp.int32), cache

    key, out = jax.random.PRNGKey(seed), []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        B, P = len(chunk), max(len(p) for p in prompt_ids)
        ids, mask = np.zeros((B, P), np.int32), np.zeros((B, P), np.int32)
        for i, p in enumerate(chunk):  # left padding: every row's next token goes to the same slot
            ids[i, P - len(p):], mask[i, P - len(p):] = p, 1
        cache = KVCache.init(model_cfg, B, P + max_new_tokens)
        key, sub = jax.random.split(key)
        token, cache = step(params, jnp.asarray(ids), jnp.asarray(mask), cache, sub)
        rows, done = [[] for _ in range(B)], np.zeros(B, bool)
        for _ in range(max_new_tokens):
            t = np.asarray(token)
            for i in np.flatnonzero(~done):
                done[i] = t[i] == eos_id
                if not done[i]:
                    rows[i].append(int(t[i]))
            if done.all():
                break
            key, sub = jax.random.split(key)
            token, cache = step(params, token[:, None], jnp.ones((B, 1), jnp.int32), cache, sub)
        out += rows
    return out


def exact_match(run_dir: str, log=lambda *a: None) -> float:
    """Held-out exact match of a run's model on the SFT eval set (rows greedy decoding reproduces)."""
    from jaxalign import models
    from jaxalign.config import load_config
    from jaxalign.data import pipeline, templates
    from jaxalign.parallel.mesh import make_mesh
    from jaxalign.train import get_task
    from jaxalign.train.loop import evaluate, make_eval_step

    cfg = load_config(os.path.join(CONFIGS, "sft.py"), [f"model.path={run_dir}", "model.preset="])
    mesh = make_mesh(cfg.mesh.shape)
    lm = models.from_pretrained(run_dir, mesh=mesh)
    tok = templates.load_tokenizer(cfg.tokenizer.path)
    data = pipeline.prepare_from_config(cfg, "eval", tok, log=log)
    task = get_task("sft")
    eval_fn = jax.jit(make_eval_step(task, lm.graphdef, cfg))
    return evaluate(eval_fn, lm.pure_params(), data, cfg, task, mesh, lm.rules)["eval/exact_match"]


def run(root: str = "runs/quickstart", log=print):
    from jaxalign.config import load_config
    from jaxalign.data.formats import read_records
    from jaxalign.data.templates import Renderer, load_tokenizer
    from jaxalign.train import get_task
    from jaxalign.train.loop import train

    if os.path.isdir(root) and os.path.exists(os.path.join(root, MARKER)):
        shutil.rmtree(root)  # the quickstart always starts fresh (only ever deletes its own directory)
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, MARKER), "w").close()

    cfg = load_config(os.path.join(CONFIGS, "sft.py"), [f"run_dir={os.path.join(root, 'sft')}"])
    log("jaxalign quickstart, stage 1/2: SFT of a tiny LLaMA (from scratch) to sort digits")
    result = train(cfg, get_task("sft"), log=log)

    tok = load_tokenizer(cfg.tokenizer.path)
    renderer = Renderer(tok)
    records = [r.data for r in read_records(cfg.data.eval_files)][:4]
    prompts = [renderer.prompt(r["messages"][:1], "sample") for r in records]
    completions = generate(result.model_config, result.graphdef, result.params, prompts, tok.eos_token_id)
    log("samples (held-out, greedy):")
    for r, c in zip(records, completions):
        answer = tok.decode(c).strip()
        mark = "ok" if answer == r["messages"][1]["content"] else f"expected {r['messages'][1]['content']}"
        log(f"  {r['messages'][0]['content']}  ->  {answer}   [{mark}]")
    metrics = jaxalign.train.loop.read_metrics(result.run_dir)
    before = next(m["eval/exact_match"] for m in metrics if "eval/exact_match" in m)
    log(f"held-out exact match: before {before:.1%}, after {result.eval_metrics['eval/exact_match']:.1%}")
    log(f"model: {result.run_dir} (HF export: {os.path.join(result.run_dir, 'hf')})")

    log("stage 2/2: a reward model from the SFT model, on pairs (a correct sort vs a mistake)")
    rm_cfg = load_config(os.path.join(CONFIGS, "rm.py"), [f"run_dir={os.path.join(root, 'rm')}",
                                                         f"model.path={result.run_dir}"])
    rm = train(rm_cfg, get_task("rm"), log=log)
    before = next(m["eval/accuracy"] for m in jaxalign.train.loop.read_metrics(rm.run_dir) if "eval/accuracy" in m)
    log(f"held-out pair accuracy: before {before:.1%}, after {rm.eval_metrics['eval/accuracy']:.1%}")
    log(f"reward model: {rm.run_dir} (HF *ForSequenceClassification export: {os.path.join(rm.run_dir, 'hf')})")
    return result, rm
