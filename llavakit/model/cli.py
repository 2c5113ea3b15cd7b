"""`llavakit init`: assemble an untrained model from parts."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="assemble an untrained LLaVA model from a vision encoder and a causal LM",
        description="Assemble vision tower + projector + causal LM and write it in the Hugging Face llava layout.",
    )
    p.add_argument("--vision", required=True, help="CLIP/SigLIP checkpoint: hub id or local dir")
    p.add_argument("--lm", required=True, help="causal LM: hub id, local dir, or short name (smollm2-135m)")
    p.add_argument("--projector", default="mlp2x_gelu", help="projector: mlp2x_gelu (LLaVA-1.5; the default) or linear (LLaVA 1.0)")
    p.add_argument("--template", default="vicuna_v1", help="chat template: plain, vicuna_v1 (the default), llava_v1, chatml, tokenizer")
    p.add_argument("--vision-feature-layer", type=int, default=-2, help="hidden layer to take features from (default -2)")
    p.add_argument("--select-strategy", choices=["default", "full"], default=None,
                   help="'default' drops CLS, 'full' keeps it (default: drop CLS if the encoder has one)")
    p.add_argument("--image-aspect-ratio", choices=["pad", "resize"], default="pad",
                   help="'pad' to square with the mean colour (LLaVA-1.5) or the encoder's own resize/crop")
    p.add_argument("--seed", type=int, default=0, help="seed for the projector's initial weights")
    p.add_argument("--out", required=True, help="output dir (new or empty)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llavakit.model.build import InitConfig, init_model

    cfg = InitConfig(
        vision=args.vision, lm=args.lm, out=args.out, projector=args.projector, template=args.template,
        vision_feature_layer=args.vision_feature_layer, select_strategy=args.select_strategy,
        image_aspect_ratio=args.image_aspect_ratio, seed=args.seed,
    )
    out = init_model(cfg)
    print(f"wrote {out} (projector {cfg.projector}, template {cfg.template})")
    return 0
