"""Evaluation: benchmarks in their official formats and metrics, a resumable runner, an LLM judge.

    from llavakit.eval.registry import BENCHMARKS          # name -> load(data_path) / score(items, answers)
    from llavakit.eval.runner import evaluate              # evaluate(name, data, predict_fn, out_dir, batch_size)
    from llavakit.eval.offline import build_offline        # offline benchmark from a held-out generated world

Importing this package imports nothing else; see docs/evaluation.md.
"""
