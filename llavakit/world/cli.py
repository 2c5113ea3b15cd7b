"""`llavakit world`: generate one split of the synthetic image-text world."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .config import (
    BACKGROUNDS,
    COLORS,
    DEFAULT_CLIPART_DIR,
    DEFAULT_CLIPART_SUBJECTS,
    SHAPES,
    SPLITS,
    WorldConfig,
)

PROGRESS_MIN = 1000


def _names(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list ('circle,star' → ('circle', 'star'))."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `world` subcommand."""
    p = subparsers.add_parser(
        "world",
        help="generate synthetic images with COCO annotations, captions and scene graphs",
        description="Generate one split of the synthetic world into --out (layout: docs/world-format.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (one split per directory)")
    p.add_argument("--num-images", type=int, default=100, metavar="N", help="number of images")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="world seed")
    p.add_argument("--split", default="train", choices=SPLITS, help="split (disjoint seeds and ids)")
    g = p.add_argument_group("image")
    g.add_argument("--min-size", type=int, default=128, metavar="PX", help="smallest sampled side")
    g.add_argument("--max-size", type=int, default=224, metavar="PX", help="largest sampled side")
    g.add_argument("--width", type=int, default=None, metavar="PX", help="fixed width")
    g.add_argument("--height", type=int, default=None, metavar="PX", help="fixed height")
    g.add_argument("--backgrounds", type=_names, default="plain", metavar="LIST",
                   help=f"comma list of background kinds from: {', '.join(BACKGROUNDS)}")  # fmt: skip
    g.add_argument("--background-colors", type=_names, default=",".join(COLORS), metavar="LIST",
                   help="comma list of background colours")  # fmt: skip
    g.add_argument("--png-level", type=int, default=1, metavar="0-9", help="PNG compression level")
    g = p.add_argument_group("objects")
    g.add_argument("--min-objects", type=int, default=1, metavar="K", help="fewest objects per image")
    g.add_argument("--max-objects", type=int, default=6, metavar="K", help="most objects per image")
    g.add_argument("--max-overlap", type=float, default=0.05, metavar="IOU",
                   help="largest IoU allowed between two object boxes")  # fmt: skip
    g.add_argument("--object-scale", type=float, default=1.0, metavar="X",
                   help="multiply every size class's extent (larger objects when > 1)")  # fmt: skip
    g.add_argument("--categories", type=_names, default=",".join(SHAPES), metavar="LIST",
                   help="comma list of shapes")  # fmt: skip
    g.add_argument("--colors", type=_names, default=",".join(COLORS), metavar="LIST",
                   help="comma list of object colours")  # fmt: skip
    g = p.add_argument_group("extras")
    g.add_argument("--text-prob", type=float, default=0.0, metavar="P",
                   help="probability of a short rendered word per image")  # fmt: skip
    g.add_argument("--chart-prob", type=float, default=0.0, metavar="P",
                   help="probability of a bar chart per image")  # fmt: skip
    g.add_argument("--clipart-prob", type=float, default=0.0, metavar="P",
                   help="probability that an object is clip art (needs openclipart-png)")  # fmt: skip
    g.add_argument("--clipart-dir", default=DEFAULT_CLIPART_DIR, metavar="DIR",
                   help="clip-art root with <subject>/.../*.png")  # fmt: skip
    g.add_argument("--clipart-subjects", type=_names, default=",".join(DEFAULT_CLIPART_SUBJECTS),
                   metavar="LIST", help="comma list of subject folders to use ('' for all)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> WorldConfig:
    """Build (and so validate) the WorldConfig for parsed arguments."""
    return WorldConfig(
        out=args.out, num_images=args.num_images, seed=args.seed, split=args.split,
        min_size=args.min_size, max_size=args.max_size, width=args.width, height=args.height,
        min_objects=args.min_objects, max_objects=args.max_objects, max_overlap=args.max_overlap,
        object_scale=args.object_scale,
        categories=args.categories, colors=args.colors, backgrounds=args.backgrounds,
        background_colors=args.background_colors, text_prob=args.text_prob,
        chart_prob=args.chart_prob, clipart_prob=args.clipart_prob, clipart_dir=args.clipart_dir,
        clipart_subjects=args.clipart_subjects,
        png_compress_level=args.png_level,
    )  # fmt: skip


def _progress(total: int) -> Callable[[int], None] | None:
    """A callback printing `done/total` to stderr every 10% (only for runs of 1000+ images)."""
    if total < PROGRESS_MIN:
        return None
    step = max(1, total // 10)

    def report(done: int) -> None:
        if done % step == 0 and done < total:
            print(f"world: {done}/{total} images", file=sys.stderr, flush=True)

    return report


def run(args: argparse.Namespace) -> int:
    """Generate the world; print count, rate and output directory."""
    from .generate import generate_world

    config = config_from_args(args)
    summary = generate_world(config, progress=None if args.quiet else _progress(config.num_images))
    if not args.quiet:
        print(
            f"world: {summary.num_images} {summary.split} images, {summary.num_objects} objects, "
            f"{summary.images_per_sec:.0f} images/s, {summary.seconds:.2f}s -> {summary.out}"
        )
    return 0
