"""`llavakit chat` (REPL or one-shot) and `llavakit predict` (LLaVA eval JSONL, resumable)."""

from __future__ import annotations

import argparse

CHAT_HELP = "commands: /image PATH adds an image to your next message, /reset clears the conversation, /quit exits"


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "chat", help="chat with a model (streamed; KV cache kept across turns)",
        description="Multi-turn chat with streamed answers. With QUESTION: answer once, print only the answer, exit. "
                    + CHAT_HELP + ".",
    )
    _model_args(c)
    c.add_argument("--image", action="append", default=[], metavar="PATH", help="image for the first message (repeatable)")
    c.add_argument("--system", default=None, help="system message (default: the template's)")
    c.add_argument("--no-kv-reuse", action="store_true", help="recompute the whole conversation every turn")
    c.add_argument("question", nargs="?", default=None, help="one-shot: answer this and exit")
    _sampling_args(c, max_new_tokens=512)
    c.set_defaults(func=run_chat)

    p = sub.add_parser(
        "predict", help="answer a LLaVA eval question file (JSONL), resumable",
        description="Answer every line {question_id, image, text} of a JSONL file; write {question_id, prompt, text, "
                    "answer_id, model_id, metadata} lines. Rerunning skips questions already in --out.",
    )
    _model_args(p)
    p.add_argument("--questions", required=True, help="JSONL questions: question_id, text, optional image")
    p.add_argument("--images-dir", default=".", help="dir the 'image' fields are relative to")
    p.add_argument("--out", required=True, help="JSONL answers (appended to; existing question_ids are skipped)")
    p.add_argument("--model-id", default=None, help="model_id written to each answer (default: model dir name)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch (default 8)")
    _sampling_args(p, max_new_tokens=128)
    p.set_defaults(func=run_predict)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model dir or short name (default: the shipped default model)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantization of the LM's linear layers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    template_arg(p)


def template_arg(p: argparse.ArgumentParser) -> None:
    """`--template NAME` (chat, predict, serve)."""
    p.add_argument("--template", default=None, metavar="NAME",
                   help="prompt with this registered chat template instead of the model's own (e.g. vicuna_v1 for a "
                        "llava-hf dir whose template expects content-part lists); the dir is not changed")


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def _params(args):
    from llavakit.infer.params import SamplingParams

    return SamplingParams(args.max_new_tokens, args.temperature, args.top_p, seed=args.seed)


def check_template(name: str | None) -> None:
    """An unknown --template name fails before any model is loaded (or the default one built)."""
    if name is not None:
        from llavakit.model.hfdirs import named_template

        named_template(name)


def _pipeline(args, **kw):
    from llavakit.infer.api import load_pipeline

    return load_pipeline(args.model, template=args.template, int8=args.int8, threads=args.threads, **kw)


def run_chat(args: argparse.Namespace) -> int:
    from llavakit.infer.chat import one_shot, repl

    from llavakit.infer.api import Pipeline

    params = _params(args)  # bad sampling options, template names and images fail before the model loads
    check_template(args.template)
    images = Pipeline.load_images(args.image)
    pipe = _pipeline(args)
    if args.question is not None:
        return one_shot(pipe, images, args.question, params, system=args.system)
    return repl(pipe, images, params, system=args.system, reuse_kv=not args.no_kv_reuse)


def run_predict(args: argparse.Namespace) -> int:
    from llavakit.infer.predict import predict

    params = _params(args)
    check_template(args.template)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    pipe = _pipeline(args, max_batch_size=args.batch_size)
    summary = predict(pipe, args.questions, args.images_dir, args.out, params,
                      model_id=args.model_id or pipe.model_id, batch_size=args.batch_size)
    import sys

    print(summary, file=sys.stderr)
    return 0
