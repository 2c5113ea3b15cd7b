"""Vision-to-language projectors: a plain dict registry with exact keys.

`mlp2x_gelu` (LLaVA-1.5) is transformers' own `LlavaMultiModalProjector` (linear_1, GELU,
linear_2), so checkpoints load in `LlavaForConditionalGeneration` unchanged. `linear`
(LLaVA 1.0) is one matrix; transformers has no such llava projector, so a `linear` checkpoint
loads only through llavakit (see docs/model.md).
"""

from __future__ import annotations

from torch import nn
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector


class LinearProjector(nn.Module):
    """LLaVA 1.0: one linear map from vision features to LM embeddings."""

    def __init__(self, config):
        super().__init__()
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.linear_1 = nn.Linear(
            config.vision_config.hidden_size * layers,
            config.text_config.hidden_size,
            bias=config.multimodal_projector_bias,
        )

    def forward(self, image_features):  # [B, N, Dv] -> [B, N, Dt]
        return self.linear_1(image_features)


PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "mlp2x_gelu": LlavaMultiModalProjector,
}


def build_projector(name: str, config) -> nn.Module:
    if name not in PROJECTORS:
        raise KeyError(f"unknown projector {name!r}; known: {', '.join(PROJECTORS)}")
    return PROJECTORS[name](config)
