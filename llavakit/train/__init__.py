"""Two-stage LLaVA training: `align` (projector) and `instruct` (projector + LM, full or LoRA).

`llavakit train CONFIG.yaml` (cli.py) -> config.py (typed config) -> trainer.py (the loop around
accelerate) with data.py (index, lazy samples, grouped batches), features.py (vision feature
cache), model.py (freezing, LoRA, param groups), checkpoint.py, metrics.py, export.py, dryrun.py.
"""
