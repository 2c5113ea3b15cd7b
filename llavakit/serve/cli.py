"""`llavakit serve`: the OpenAI-compatible server with a chat page at /."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (+ a chat page at /)",
        description="POST /v1/chat/completions (text and image_url parts, stream: true as SSE), GET /v1/models, "
                    "GET /health, and a chat page at /. Concurrent requests are batched.",
    )
    p.add_argument("--model", default="default", help="model dir or short name (default: the shipped default model)")
    p.add_argument("--model-id", default=None, help="name clients send as 'model' (default: model dir name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", default=os.environ.get("LLAVAKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLAVAKIT_API_KEY; none = open)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantization of the LM's linear layers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    from llavakit.infer.cli import template_arg

    template_arg(p)  # --template NAME
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503 (default 64)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="batch requests arriving within this long of the previous one (default 5)")
    p.add_argument("--max-images", type=int, default=4, help="images per request (default 4)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit in MB (default 20)")
    p.add_argument("--max-image-mb", type=float, default=10.0, help="per-image byte limit in MB (default 10)")
    p.add_argument("--max-image-pixels", type=int, default=16_000_000, help="per-image pixel limit (default 16M)")
    p.add_argument("--max-tokens", type=int, default=512, help="max_tokens of a request that sets none (default 512)")
    p.add_argument("--local-images-dir", default=None, help="allow file paths in image_url, from under this dir only")
    p.add_argument("--allow-remote-images", action="store_true", help="allow http(s) image URLs (off by default)")
    p.add_argument("--remote-timeout", type=float, default=10.0,
                   help="seconds per operation of a remote image fetch: connect, each read (default 10)")
    p.add_argument("--remote-total-timeout", type=float, default=30.0,
                   help="seconds for a whole remote image fetch, body included (default 30)")
    p.add_argument("--remote-image-hosts", default="", metavar="HOST[,HOST...]",
                   help="fetch remote images only from these hosts (names or IP literals, comma-separated; "
                        "listed hosts are trusted whatever their addresses). Default: any public host; hosts "
                        "resolving to private, loopback, link-local or other non-public addresses are refused")
    p.set_defaults(func=run)


def config_from_args(args):
    from pathlib import Path

    from llavakit.serve.app import ServeConfig
    from llavakit.serve.images import ImageSources

    for name in ("max_batch_size", "max_queue", "max_images", "max_tokens", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    local = Path(args.local_images_dir) if args.local_images_dir else None
    if local is not None and not local.is_dir():
        raise FileNotFoundError(f"--local-images-dir {local} is not a directory")
    if args.remote_image_hosts.strip() and not args.allow_remote_images:
        raise ValueError("--remote-image-hosts has no effect without --allow-remote-images (remote image URLs are "
                         "off by default); add --allow-remote-images or drop --remote-image-hosts")
    sources = ImageSources(max_bytes=int(args.max_image_mb * 2**20), local_dir=local,
                           allow_remote=args.allow_remote_images, remote_timeout_s=args.remote_timeout,
                           remote_total_timeout_s=args.remote_total_timeout,
                           remote_hosts=remote_hosts_from_arg(args.remote_image_hosts))
    return ServeConfig(api_key=args.api_key or None, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                       batch_wait_ms=args.batch_wait_ms, max_images=args.max_images,
                       max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                       default_max_tokens=args.max_tokens, images=sources)


def remote_hosts_from_arg(value: str) -> tuple[str, ...]:
    """`--remote-image-hosts a,b` -> ('a', 'b'), checked; ValueError naming the flag and the bad entry."""
    from llavakit.serve.images import normalise_host

    if not value.strip():
        return ()
    try:
        return tuple(normalise_host(host) for host in value.split(","))
    except ValueError as exc:
        raise ValueError(f"--remote-image-hosts {value!r}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import sys

    import uvicorn

    from llavakit.infer.api import load_pipeline
    from llavakit.infer.cli import check_template
    from llavakit.serve.app import create_app

    config = config_from_args(args)
    check_template(args.template)  # an unknown name fails before the model loads
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it can use it", file=sys.stderr)
    pipe = load_pipeline(args.model, template=args.template, int8=args.int8, threads=args.threads,
                         max_batch_size=args.max_batch_size, model_id=args.model_id)
    print(f"serving {pipe.model_id} on http://{args.host}:{args.port}/ (OpenAI API under /v1)", file=sys.stderr)
    uvicorn.run(create_app(pipe, config), host=args.host, port=args.port, log_level="warning")
    return 0
