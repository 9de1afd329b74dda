"""The tiny from-scratch training config the trainer tests share (one place for its common settings)."""
from jaxalign.config import apply_overrides, base_config


def tiny_config(task, run_dir, tokenizer, train_files, cache_dir, *overrides, **fields):
    """Preset `tiny` in float32, 32-token rows, a constant lr, a metrics line every step, no progress bar.
    `fields` are {"section.key": value} (dots written as "__" in keyword names), then 'a.b=value' overrides."""
    c = base_config()
    flat = {"task": task, "run_dir": str(run_dir), "model.preset": "tiny", "model.dtype": "float32",
            "tokenizer.path": tokenizer, "data.train_files": train_files, "data.max_length": 32,
            "data.cache_dir": cache_dir, "optim.schedule": "constant", "train.log_every": 1, "train.progress": False}
    flat.update({k.replace("__", "."): v for k, v in fields.items()})
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = c
        for s in sections:
            node = node[s]
        node[name] = value
    return apply_overrides(c, overrides)
