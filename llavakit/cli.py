"""The `llavakit` command.

Each subcommand lives in its stage's own `cli` module, which exposes
`register(subparsers)` (argparse only, no heavy imports) and sets `func` on its parser.
`COMMANDS` is the plain, exact list of those modules; the order is the order in `--help`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: list[str] = [
    "llavakit.world.cli",  # world
    "llavakit.datagen.cli",  # datagen
    "llavakit.model.cli",  # init
    "llavakit.data.cli",  # data inspect
    "llavakit.train.cli",  # train
    "llavakit.infer.cli",  # chat, predict
    "llavakit.serve.cli",  # serve
    "llavakit.eval.cli",  # eval
    "llavakit.interop.cli",  # convert, export
    "llavakit.recipe.cli",  # recipe, ablations, demo
]


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llavakit",
        description="LLaVA-style visual instruction tuning: generate data, train, chat, serve, evaluate.",
    )
    from llavakit import __version__

    parser.add_argument("--version", action="version", version=f"llavakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def _input_error(exc: Exception) -> bool:
    """Errors about the user's input or files, said in one line; anything else is a bug and keeps its traceback.

    OSError covers a missing, existing, unreadable or non-image file (PIL's UnidentifiedImageError is one).
    """
    from PIL import Image

    return isinstance(exc, (CLIError, OSError, ValueError, KeyError, Image.DecompressionBombError))


def main(argv: list[str] | None = None) -> int:
    import os

    # transformers' per-key load reports are noise for a CLI user; LLAVAKIT_DEBUG=1 shows them and tracebacks.
    debug = os.environ.get("LLAVAKIT_DEBUG") == "1"
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if debug or not _input_error(exc):
            raise
        print(f"llavakit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
