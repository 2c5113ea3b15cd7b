"""The seam to the inference layer: turn a `llavakit.infer` pipeline into a `PredictFn`.

Expected of `llavakit.infer.api`:
    pipe = load_pipeline(model)            # model dir or name
    pipe.generate(batch, max_new_tokens=N, temperature=0.0) -> list[str]
where `batch` is a list of (images: list[PIL.Image.Image], prompt: str), the prompt being the
user text with one `<image>` marker per image; the pipeline applies the chat template.
"""

from __future__ import annotations

from typing import Any

from llavakit.eval.common import EvalError, EvalItem, PredictFn


def pipeline_predict_fn(pipe: Any, max_new_tokens: int | None = None) -> PredictFn:
    """Adapt `pipe.generate` to a PredictFn: open each item's images as RGB, greedy decoding.

    `max_new_tokens` overrides the items' own budgets (else the largest in the batch is used).
    """

    def predict(items: list[EvalItem]) -> list[str]:
        from PIL import Image

        def open_rgb(path: str) -> Image.Image:
            with Image.open(path) as im:
                return im.convert("RGB")

        batch = [([open_rgb(p) for p in item.images], item.prompt) for item in items]
        budget = max_new_tokens or max(item.max_new_tokens for item in items)
        return list(pipe.generate(batch, max_new_tokens=budget, temperature=0.0))

    return predict


def load_predict_fn(model: str, max_new_tokens: int | None = None) -> PredictFn:
    """Load `model` with the inference layer and adapt it (imports torch and friends)."""
    try:
        from llavakit.infer.api import load_pipeline
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("llavakit.infer"):
            raise
        raise EvalError(f"the inference layer is not available ({exc}); `llavakit eval score` grades existing answers") from None
    return pipeline_predict_fn(load_pipeline(model), max_new_tokens)
