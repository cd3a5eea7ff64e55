"""``specs serve``: score image-caption pairs over HTTP for many clients (one model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specs_metric.cli.common import (
    DEFAULT_MODEL,
    MODEL_HELP,
    add_model_options,
    load_scorer,
    positive_int,
)
from specs_metric.errors import UsageError
from specs_metric.scoring.scales import SCALES


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value}")
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"expected 0 to 10000 ms, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="score image-caption pairs over HTTP for many clients (dynamic batching)",
        description=(
            "Load the model once and serve POST /score ({\"pairs\": [{\"image_b64\", "
            "\"caption\"}, ...]} -> one result per pair, as `specs score` rows) and GET "
            "/health. Concurrent requests are merged into batches of up to "
            "--max-batch-pairs pairs; beyond --max-queue-pairs pairs admitted, requests "
            "are refused at once with 503 and Retry-After. Needs pip install "
            "'specs-metric[serve]'."
        ),
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (8000; 0: a free port)")
    p.add_argument(
        "--image-root",
        type=Path,
        help="accept image paths relative to this folder (never outside it); without it, "
        "only image bytes are accepted",
    )
    p.add_argument("--scale", default="specs", choices=SCALES, help="score scale")
    p.add_argument(
        "--max-batch-pairs", type=positive_int, default=64,
        help="pairs scored together in one batch (64)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue-pairs", type=positive_int, default=1024,
        help="pairs admitted and not yet answered before requests get 503 (1024)",
    )  # fmt: skip
    p.add_argument(
        "--max-wait-ms", type=_milliseconds, default=5.0,
        help="how long a batch that is not full waits for more requests (5)",
    )  # fmt: skip
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.integrations import require
    from specs_metric.integrations.pairs import PairScorer
    from specs_metric.integrations.serve import ServeOptions, serve

    require("fastapi", "serve", "specs serve")
    require("uvicorn", "serve", "specs serve")
    if args.image_root is not None and not args.image_root.is_dir():
        raise UsageError(f"--image-root {args.image_root}: no such folder")
    if args.max_queue_pairs < args.max_batch_pairs:
        raise UsageError("--max-queue-pairs must be at least --max-batch-pairs")
    scorer = load_scorer(args, args.model)
    pairs = PairScorer(
        scorer, args.scale, image_root=args.image_root, confine=True,
        accept_paths=args.image_root is not None, image_batch=args.max_batch_pairs,
    )  # fmt: skip
    options = ServeOptions(
        max_batch_pairs=args.max_batch_pairs,
        max_queue_pairs=args.max_queue_pairs,
        max_wait_ms=args.max_wait_ms,
    )

    def ready(host: str, port: int) -> None:
        print(
            f"specs serve: {scorer.name} on {scorer.device} ({scorer.precision}), listening "
            f"on http://{host}:{port} (POST /score, GET /health)",
            file=sys.stderr, flush=True,
        )  # fmt: skip

    serve(pairs, args.host, args.port, options, on_ready=ready)
    return 0
