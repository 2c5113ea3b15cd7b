"""`llavakit convert` and `llavakit export`: checkpoints in from other layouts, out to other runtimes."""

from __future__ import annotations

import argparse

SOURCES = ("llava", "llava-hf")
FORMATS = ("hf", "gguf")
OUTTYPES = ("f32", "f16", "q8_0")


def register(sub: argparse._SubParsersAction) -> None:
    _register_convert(sub)
    _register_export(sub)


def _register_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an original-LLaVA (or llava-hf) checkpoint to a llavakit model dir",
        description="Convert a checkpoint from the original LLaVA repo (full, stage-1 mm_projector.bin, or LoRA dir) "
        "or a llava-hf dir to llavakit's HF-native layout with processor and chat template.",
    )
    p.add_argument("src", help="checkpoint dir")
    p.add_argument("--from", dest="source", choices=SOURCES, required=True, help="layout of SRC")
    p.add_argument("--out", required=True, help="output dir (new or empty)")
    p.add_argument("--vision", default=None, help="vision tower dir or hub id (default: the config's mm_vision_tower)")
    p.add_argument("--lm", "--base", dest="lm", default=None,
                   help="base LM dir for stage-1 (mm_projector.bin) and LoRA dirs (the original's --model-base)")
    p.add_argument("--template", default=None,
                   help="chat template to record (llava: default vicuna_v1, plain for a stage-1 mm_projector.bin; "
                        "llava-hf: default the dir's own chat template)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="weight dtype of the output (llava only; default: that of the checkpoint's LM weights)")
    p.set_defaults(func=run_convert)


def _register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a llavakit model for other runtimes (HF/vLLM/SGLang, GGUF for llama.cpp)",
        description="--format hf: a clean llava-hf dir (canonical weight names, processor, chat template). "
        "--format gguf: DIR/model-<outtype>.gguf (language model) + DIR/mmproj-<type>.gguf (vision encoder + projector).",
    )
    p.add_argument("model", help="llavakit model dir (or a llava-hf dir)")
    p.add_argument("--format", choices=FORMATS, required=True, help="output format")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--outtype", choices=OUTTYPES, default="f32",
                   help="GGUF weight type of the language model (the mmproj is f32 for f32, else f16)")
    p.set_defaults(func=run_export)


def run_convert(args: argparse.Namespace) -> int:
    if args.source == "llava":
        from llavakit.interop.convert import ConvertConfig, convert_llava

        cfg = ConvertConfig(src=args.src, out=args.out, vision=args.vision, lm=args.lm,
                            template=args.template, dtype=args.dtype)
        out = convert_llava(cfg)
    else:
        from llavakit.interop.hf import import_hf

        out = import_hf(args.src, args.out, template=args.template)
    print(f"wrote {out} (from {args.source} {args.src})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from llavakit.interop.hf import export_hf

        print(f"wrote {export_hf(args.model, args.out)}")
        return 0
    from llavakit.interop.gguf import export_gguf

    files = export_gguf(args.model, args.out, outtype=args.outtype)
    print(f"wrote {files.lm} and {files.mmproj}")
    for note in files.notes:
        print(f"note: {note}")
    return 0
