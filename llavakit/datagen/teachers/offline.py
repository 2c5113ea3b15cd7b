"""The offline teacher: deterministic outputs computed from the scene graph / annotations.

It ignores the prompt text and answers from the image's objects (via `SceneQA`), but it emits
the same Question/===/Answer text (or prose) as a real teacher, so its outputs go through the
same parsing and validation. Output depends on the seed, the image's scene (its objects, relations,
captions, background, texts, chart, size), the dataset's vocabularies (`SceneQA`) and the kind: `inputs`
hands all of them (not the prompt, which it ignores) to the cache key.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any

from llavakit.datagen.parse import format_qa
from llavakit.datagen.sceneqa import GENERATOR_VERSION, SceneQA


class OfflineTeacher:
    name = "offline"
    deterministic = True
    max_concurrency = 1

    def __init__(self, dataset, *, seed: int = 0, min_turns: int = 3, max_turns: int = 6):
        self.dataset = dataset
        self.seed = seed
        self.min_turns, self.max_turns = min_turns, max_turns
        self.qa = SceneQA(dataset)
        self.model = f"sceneqa-v{GENERATOR_VERSION}-seed{seed}"

    @classmethod
    def from_config(cls, config, *, dataset, on_retry=None) -> OfflineTeacher:
        return cls(dataset, seed=config.seed)

    def inputs(self, image, messages: list[dict]) -> dict:
        """What its output for `image` depends on (the cache key's digest)."""
        scene = asdict(image)
        scene.pop("file_name")  # where the file lies does not change the answers
        scene["relations"] = sorted(map(list, image.relations))
        vocab = {"categories": self.qa.categories, "colors": self.qa.colors, "sizes": self.qa.sizes, "thing": self.qa.thing}
        return {"scene": scene, "vocabulary": vocab, "turns": [self.min_turns, self.max_turns]}

    def complete(self, messages: list[dict], *, kind: str, image_id: Any, attempt: int = 0) -> str:
        img = self.dataset.by_id[image_id]
        rng = random.Random(f"{self.seed}/{image_id}/{kind}")
        if kind == "conversation":
            qas = self.qa.sample(img, rng, rng.randint(self.min_turns, self.max_turns))
            return format_qa([(q.question, q.long) for q in qas])
        if kind == "detail":
            return self.qa.describe(img, rng)
        if kind == "reasoning":
            qa = self.qa.reason(img, rng)
            return format_qa([(qa.question, qa.long)])
        raise ValueError(f"offline teacher: unknown kind {kind!r}")
