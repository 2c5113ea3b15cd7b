"""Inference: prompts through the training render path, a batched decode loop, chat with KV reuse.

`llavakit.infer.api.load_pipeline(model)` is the entry point; nothing heavy is imported here.
"""
