"""The seam to the inference layer: turn a `llavakit.infer` pipeline into a `PredictFn`.

Expected of `llavakit.infer.api` (as `llavakit predict` uses it):
    pipe = load_pipeline(model)                        # model dir or name
    prompt = pipe.prompt(images, text)                 # PromptError names what is wrong
    pipe.run_prompts(prompts, params) -> [Completion]  # one left-padded batch; .text per prompt
    pipe.max_batch_size
where `images` are RGB PIL images from `llavakit.data.images.load_image` (the loader of training,
chat and predict: size limits, every mode to RGB, errors naming the file) and `text` is the user
turn with one `<image>` marker per image; the pipeline applies the chat template.
"""

from __future__ import annotations

from typing import Any

from llavakit.eval.common import EvalError, EvalItem, PredictFn


def item_prompt(pipe: Any, item: EvalItem) -> Any:
    """The pipeline prompt of one item, its images loaded by llavakit's loader; an `EvalError` naming the
    question (and the image) if an image cannot be used or the prompt cannot be built."""
    from llavakit.data.images import ImageError, load_image
    from llavakit.infer.prompt import PromptError

    try:
        images = [load_image(path) for path in item.images]
    except ImageError as exc:  # the message starts with the image's path
        raise EvalError(f"question {item.question_id!r}: {exc}") from None
    try:
        return pipe.prompt(images, item.prompt)
    except PromptError as exc:
        shown = ", ".join(item.images) or "no image"
        raise EvalError(f"question {item.question_id!r} ({shown}): {exc}") from None


def pipeline_predict_fn(pipe: Any, max_new_tokens: int | None = None) -> PredictFn:
    """Adapt a pipeline to a PredictFn: one prompt per item (`item_prompt`), greedy decoding, as `pipe.generate`
    would run the batch: `pipe.max_batch_size` rows at a time, `max_new_tokens` (else the largest budget in the
    batch; the runner batches items of like budgets together) for every row."""

    def predict(items: list[EvalItem]) -> list[str]:
        from llavakit.infer.params import SamplingParams

        prompts = [item_prompt(pipe, item) for item in items]
        budget = max_new_tokens or max(item.max_new_tokens for item in items)
        params = [SamplingParams(budget, temperature=0.0)] * len(prompts)
        step = pipe.max_batch_size
        texts: list[str] = []
        for lo in range(0, len(prompts), step):
            texts.extend(c.text for c in pipe.run_prompts(prompts[lo : lo + step], params[lo : lo + step]))
        return texts

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
