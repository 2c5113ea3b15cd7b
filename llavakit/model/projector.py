"""Vision-to-language projectors: a plain dict registry with exact keys.

`mlp2x_gelu` (LLaVA-1.5) is transformers' own `LlavaMultiModalProjector` (linear_1, GELU,
linear_2), so checkpoints load in `LlavaForConditionalGeneration` unchanged. `linear` (LLaVA 1.0)
is one matrix, written in the same layout: `projector_hidden_act: "linear"` (transformers' identity
activation), the matrix as `linear_1` and an identity `linear_2` (zero bias), so transformers
computes exactly the one matrix (see docs/model.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector


class FixedIdentity(nn.Module):
    """A [D, D] identity laid out as an nn.Linear's `weight` (and zero `bias`), held as buffers.

    Buffers, not parameters: they are saved (transformers loads them as its `linear_2`) but no
    optimizer, freezing rule or LoRA `modules_to_save` copy can ever train them, so the saved
    `linear_2` is the identity by construction rather than by a freeze every training path must keep.
    """

    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.register_buffer("weight", torch.eye(width))  # [D, D]
        self.register_buffer("bias", torch.zeros(width) if bias else None)  # [D]

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity (for a checkpoint that lacks these tensors)."""
        self.weight.copy_(torch.eye(self.weight.shape[0]))
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x):  # [..., D] -> [..., D], exactly x (the same op transformers' linear_2 runs)
        return F.linear(x, self.weight, self.bias)


class LinearProjector(nn.Module):
    """LLaVA 1.0: one linear map from vision features to LM embeddings (`linear_1`; `linear_2` is fixed)."""

    def __init__(self, config):
        super().__init__()
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.linear_1 = nn.Linear(
            config.vision_config.hidden_size * layers,
            config.text_config.hidden_size,
            bias=config.multimodal_projector_bias,
        )
        self.linear_2 = FixedIdentity(config.text_config.hidden_size, bias=config.multimodal_projector_bias)

    def forward(self, image_features):  # [B, N, Dv] -> [B, N, Dt]
        return self.linear_2(self.linear_1(image_features))


PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "mlp2x_gelu": LlavaMultiModalProjector,
}


HIDDEN_ACT: dict[str, str] = {"linear": "linear", "mlp2x_gelu": "gelu"}
"""projector -> the config's `projector_hidden_act` under which transformers' llava projector computes it."""


def build_projector(name: str, config) -> nn.Module:
    if name not in PROJECTORS:
        raise KeyError(f"unknown projector {name!r}; known: {', '.join(PROJECTORS)}")
    return PROJECTORS[name](config)
