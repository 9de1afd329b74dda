"""Trainers: the generic loop (loop.py) around the pure step (step.py), the run set-up (run.py), hooks
(hooks.py), and one file per task (sft, reward, preference, grpo, ppo) registered in registry.py."""
