"""`jaxalign quickstart`: the bundled end-to-end demo, no arguments, a fresh machine, a few minutes on CPU.

Stage 1 (SFT): a tiny LLaMA, from scratch, learns to sort digits; prints held-out exact match before and
after, and greedy samples. Stage 2 (RM): a reward model from it learns to tell a correct sort from a
mistake; prints held-out pair accuracy before and after. Stage 3 (DPO): the SFT model's own mistakes
(sampled with jaxalign.sampling) against the answers; prints held-out rewards/accuracies and exact match
(greedy and sampled) before and after. Stages 4 and 5 (GRPO, PPO with a critic): online RL from the SFT model
with a verifiable reward (1 when the completion is the prompt's digits sorted); prints the held-out mean
reward at the sampling temperature and exact match (greedy and sampled) before and after.
"""
import json
import os
import shutil
import time

import numpy as np

import jaxalign
from jaxalign import sampling
from jaxalign.config import load_config
from jaxalign.data.formats import read_records
from jaxalign.data.templates import Renderer, load_tokenizer
from jaxalign.train.registry import get_task
from jaxalign.train.loop import read_metrics, train

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(jaxalign.__file__)), "recipes", "quickstart")
MARKER = ".jaxalign-quickstart"


def complete(lm, tok, prompts: list, temperature: float = 0.0, n: int = 1, seed: int = 0) -> list:
    """Completion texts of token-id prompts (n samples each, grouped by sample) with the jaxalign sampler."""
    ids, mask = sampling.left_pad(prompts * n, tok.pad_token_id)
    out = sampling.generate(lm, ids, mask, max_new_tokens=16, temperature=temperature,
                            eos_token_id=tok.eos_token_id, seed=seed)
    return [tok.decode(c).strip() for c in sampling.completions(out)]


def sorting_task(path: str, tok):
    """(records, prompt ids, reference answers) of a bundled digit-sorting file."""
    records = [r.data for r in read_records(path)]
    renderer = Renderer(tok)
    prompts = [renderer.prompt(r["messages"][:1], path) for r in records]
    return records, prompts, [r["messages"][1]["content"] for r in records]


def task_accuracy(lm, tok, prompts, answers, temperature=0.0, n=1, seed=0) -> float:
    """Exact match of greedy (or sampled: the mean over n samples per prompt) completions."""
    got = complete(lm, tok, prompts, temperature, n, seed)
    return float(np.mean([g == a for g, a in zip(got, answers * n)]))


def on_policy_pairs(lm, tok, records, prompts, answers, path, samples=4, seed=1) -> int:
    """DPO pairs from the model's own mistakes: for each prompt, `samples` completions at temperature 1;
    where one is wrong, (chosen = the reference answer, rejected = that mistake). Written to `path`."""
    got = complete(lm, tok, prompts, temperature=1.0, n=samples, seed=seed)
    n = 0
    with open(path, "w") as f:
        for i, r in enumerate(records):
            wrong = [g for g in got[i::len(records)] if g != answers[i] and g]
            if wrong:
                f.write(json.dumps({"prompt": r["messages"][:1], "chosen": r["messages"][1:],
                                    "rejected": [{"role": "assistant", "content": wrong[0]}]}) + "\n")
                n += 1
    return n


def compare_exact_match(before, after, name, tok, prompts, answers, log):
    """Held-out exact match of the SFT model and a later stage's, greedy and sampled (4 per prompt at T=1)."""
    for how, T, k in (("greedy", 0.0, 1), ("sampled at temperature 1", 1.0, 4)):
        b, a = (task_accuracy(m, tok, prompts, answers, T, k) for m in (before, after))
        log(f"held-out exact match, {how}: before (SFT) {b:.1%}, after ({name}) {a:.1%}")


def first_eval(run_dir, key):
    return next(m[key] for m in read_metrics(run_dir) if key in m)


def run(root: str = "runs/quickstart", log=print):
    if os.path.isdir(root) and os.path.exists(os.path.join(root, MARKER)):
        shutil.rmtree(root)  # the quickstart always starts fresh (only ever deletes its own directory)
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, MARKER), "w").close()

    cfg = load_config(os.path.join(CONFIGS, "sft.py"), [f"run_dir={os.path.join(root, 'sft')}"])
    t0 = time.time()
    log("jaxalign quickstart, stage 1/5: SFT of a tiny LLaMA (from scratch) to sort digits")
    sft = train(cfg, get_task("sft"), log=log)
    tok = load_tokenizer(cfg.tokenizer.path)
    records, prompts, answers = sorting_task(cfg.data.eval_files, tok)
    sft_lm = sft.model()
    log("samples (held-out, greedy):")
    for r, got, want in zip(records[:4], complete(sft_lm, tok, prompts[:4]), answers):
        log(f"  {r['messages'][0]['content']}  ->  {got}   [{'ok' if got == want else f'expected {want}'}]")
    before = first_eval(sft.run_dir, "eval/exact_match")
    log(f"held-out exact match: before {before:.1%}, after {sft.eval_metrics['eval/exact_match']:.1%}")
    log(f"model: {sft.run_dir} (HF export: {os.path.join(sft.run_dir, 'hf')}); stage 1 took {time.time() - t0:.0f}s")
    t0 = time.time()

    log("stage 2/5: a reward model from the SFT model, on pairs (a correct sort vs a mistake)")
    rm_cfg = load_config(os.path.join(CONFIGS, "rm.py"), [f"run_dir={os.path.join(root, 'rm')}",
                                                         f"model.path={sft.run_dir}"])
    rm = train(rm_cfg, get_task("rm"), log=log)
    log(f"held-out pair accuracy: before {first_eval(rm.run_dir, 'eval/accuracy'):.1%}, "
        f"after {rm.eval_metrics['eval/accuracy']:.1%}")
    log(f"reward model: {rm.run_dir} (HF *ForSequenceClassification export: {os.path.join(rm.run_dir, 'hf')}); "
        f"stage 2 took {time.time() - t0:.0f}s")
    t0 = time.time()

    log("stage 3/5: DPO from the SFT model on its own mistakes (sampled at temperature 1) vs the answers")
    pairs = os.path.join(root, "dpo_pairs.jsonl")
    n = on_policy_pairs(sft_lm, tok, *sorting_task(cfg.data.train_files, tok), pairs)
    log(f"{n} on-policy pairs in {pairs}")
    dpo_cfg = load_config(os.path.join(CONFIGS, "dpo.py"), [f"run_dir={os.path.join(root, 'dpo')}",
                                                           f"model.path={sft.run_dir}", f"data.train_files={pairs}"])
    dpo = train(dpo_cfg, get_task("dpo"), log=log)
    log(f"held-out rewards/accuracies: before {first_eval(dpo.run_dir, 'eval/rewards/accuracies'):.1%}, "
        f"after {dpo.eval_metrics['eval/rewards/accuracies']:.1%}")
    compare_exact_match(sft_lm, dpo.model(), "DPO", tok, prompts, answers, log)
    log(f"policy: {dpo.run_dir} (HF export: {os.path.join(dpo.run_dir, 'hf')}); stage 3 took {time.time() - t0:.0f}s")

    rl = {}
    for stage, task, key, what in ((4, "grpo", "eval/reward", "GRPO (8 samples per prompt, group-normalised "
                                    "advantages)"), (5, "ppo", "eval/score", "PPO (actor and critic, GAE)")):
        t0 = time.time()
        log(f"stage {stage}/5: {what} from the SFT model; reward 1 when the completion sorts the prompt's digits")
        rl_cfg = load_config(os.path.join(CONFIGS, f"{task}.py"), [f"run_dir={os.path.join(root, task)}",
                                                                   f"model.path={sft.run_dir}"])
        rl[task] = train(rl_cfg, get_task(task), log=log)
        log(f"held-out mean reward (sampled at temperature 1): before {first_eval(rl[task].run_dir, key):.3f}, "
            f"after {rl[task].eval_metrics[key]:.3f}")
        compare_exact_match(sft_lm, rl[task].model(), task.upper(), tok, prompts, answers, log)
        log(f"policy: {rl[task].run_dir}; stage {stage} took {time.time() - t0:.0f}s")
    return sft, rm, dpo, rl["grpo"], rl["ppo"]
