"""Instruction data generation: `llavakit datagen`.

Turns COCO-style annotations (captions + instances, optionally a world's `scenes.jsonl`) into
LLaVA training data:

- `instruct`  conversation / detail / reasoning records from a *teacher* (offline, openai, hf),
  with prompt packs, validation, an append-only cache, resume and provenance;
- `captions`  stage-1 caption records (image + one brief-description instruction + caption);
- `vqa`       LLaVA-1.5 style short-answer and multiple-choice items;
- `mix`       combine LLaVA JSON sources with ratios and a seed.

Nothing heavy is imported here; the entry points live in their modules
(`llavakit.datagen.instruct.generate_instruct`, `...captions.generate_captions`,
`...vqa.generate_vqa`, `...mix.mix_sources`).
"""

KINDS: tuple[str, ...] = ("conversation", "detail", "reasoning")
