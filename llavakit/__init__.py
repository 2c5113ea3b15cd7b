"""llavakit: LLaVA-style visual instruction tuning, end to end.

Stages flow one way: world/datagen -> data -> model -> train -> infer/serve -> eval.
Nothing heavy is imported here; import the stage you need.
"""

__version__ = "0.1.0"
