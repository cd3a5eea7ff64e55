"""The ``specs`` command line: one module per command, each with a ``register`` function.

``register(subparsers)`` adds the command's parser and sets ``func`` (called with the parsed
namespace, returning an exit code). Commands under ``specs bench`` register on the bench
sub-parsers instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from specs_metric import __version__

# Top-level commands, in the order ``specs --help`` lists them.
COMMANDS = ["score", "models", "convert", "prepare", "train", "compare", "synth", "explain"]
# Sub-commands of ``specs bench``.
BENCH_COMMANDS: list[str] = ["human", "intrinsic", "retrieval", "zeroshot", "details"]


def build_parser() -> argparse.ArgumentParser:
    """The full ``specs`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="specs",
        description="SPECS: reference-free, specificity-aware scoring of long image captions.",
    )
    parser.add_argument("--version", action="version", version=f"specs-metric {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"specs_metric.cli.{name}").register(sub)
    if BENCH_COMMANDS:
        bench = sub.add_parser(
            "bench", help="benchmarks: intrinsic, human, retrieval, zeroshot, details"
        )
        bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
        for name in BENCH_COMMANDS:
            importlib.import_module(f"specs_metric.cli.bench_{name}").register(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specs`` console script.

    Errors caused by the user's input (a missing file, an unusable checkpoint, a model that
    cannot be downloaded, a bad value) print one line and exit with status 2; set
    ``SPECS_DEBUG=1`` for the traceback.
    """
    from specs_metric.checkpoint import CheckpointError
    from specs_metric.distributed import is_initialized, shutdown
    from specs_metric.pretrained import ModelNotAvailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    group_was_open = is_initialized()  # a caller's group is the caller's to close
    succeeded = False
    try:
        code = int(args.func(args) or 0)
        succeeded = True
        return code
    except (CheckpointError, ModelNotAvailableError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("SPECS_DEBUG") == "1":
            raise
        print(f"specs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        # Under torchrun, ranks leave together so that none aborts on a closed connection.
        if not group_was_open:
            shutdown(wait=succeeded)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
