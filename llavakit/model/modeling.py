"""llavakit's model: transformers' LLaVA, with the projector taken from our registry.

For `mlp2x_gelu` this is exactly `LlavaForConditionalGeneration` (same modules, same keys, same
forward). The subclass exists only so that `linear` (LLaVA 1.0) models build a projector whose
`linear_2` is a fixed identity (buffers, never trained), and so that dirs written before that
identity was saved still load exactly. Feature selection (layer, CLS drop), the scatter of image
features into `<image>` positions and the count check (ValueError with both counts) are
transformers' own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from transformers import LlavaForConditionalGeneration

from llavakit.model.projector import PROJECTORS, FixedIdentity, build_projector

ASPECT_MODES = ("pad", "resize")


@dataclass
class LlavakitMeta:
    """What every llavakit checkpoint records about itself (config.json, key `llavakit`)."""

    projector_type: str = "mlp2x_gelu"
    template: dict = field(default_factory=dict)
    """The full ChatTemplate record, not just its name."""
    image_aspect_ratio: str = "pad"
    """'pad': pad to square with the mean colour (LLaVA-1.5); 'resize': the encoder's own preprocessing."""
    stage: str = "init"
    """What produced the weights: init, align, instruct, converted."""
    history: list = field(default_factory=list)
    """Earlier stages' records (config summaries), oldest first."""
    version: str = ""
    """The llavakit version that wrote the dir (set by `save_model`)."""
    added_token_ids: list[int] | None = None
    """Ids of the tokens `init` / `convert` added to the LM's tokenizer (`<image>`, the template's special tokens
    it lacked, a pad token if missing), ascending. None: not recorded (a dir from before it was, or imported)."""

    def __post_init__(self) -> None:
        if self.projector_type not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector_type!r}; known: {', '.join(PROJECTORS)}")
        if self.image_aspect_ratio not in ASPECT_MODES:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_MODES}, got {self.image_aspect_ratio!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config) -> "LlavakitMeta":
        data = getattr(config, "llavakit", None)
        if not data:
            raise ValueError("this checkpoint has no 'llavakit' record in config.json (not written by llavakit?)")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class LlavakitForConditionalGeneration(LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` whose projector comes from `PROJECTORS`."""

    def __init__(self, config):
        projector = (getattr(config, "llavakit", None) or {}).get("projector_type", "mlp2x_gelu")
        if projector == "linear":
            # transformers' form of LLaVA 1.0's projector (see projector.py); dirs written before recorded "gelu"
            config.projector_hidden_act = "linear"
        super().__init__(config)
        if projector != "mlp2x_gelu":
            self.model.multi_modal_projector = build_projector(projector, config)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """transformers' loader; a `linear` projector saved without `linear_2` (llavakit before the identity
        `linear_2` was written) gets that identity, which transformers would leave uninitialised."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        fixed = getattr(model.model.multi_modal_projector, "linear_2", None)
        prefix = "model.multi_modal_projector.linear_2."
        if isinstance(fixed, FixedIdentity) and {prefix + "weight", prefix + "bias"} & set(info["missing_keys"]):
            fixed.reset()
        return (model, info) if output_loading_info else model

    def forward(self, input_ids=None, pixel_values=None, **kwargs):
        if input_ids is not None and pixel_values is not None:
            check_image_tokens(input_ids, pixel_values, self.config)
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, **kwargs)


def check_image_tokens(input_ids, pixel_values, config) -> None:
    """Raise ValueError with both counts when `<image>` tokens and images disagree.

    transformers raises too, but reports feature *elements*; this names tokens and images.
    """
    found = int((input_ids == config.image_token_id).sum())  # input_ids: [B, T]
    expected = pixel_values.shape[0] * config.image_seq_length  # pixel_values: [N, 3, H, W]
    if found != expected:
        raise ValueError(
            f"image tokens and image features do not match: {found} <image> tokens in input_ids, "
            f"{expected} image features ({pixel_values.shape[0]} image(s) x {config.image_seq_length})"
        )
