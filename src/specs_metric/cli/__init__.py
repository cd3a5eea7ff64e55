"""The ``specs`` command line: one module per command, each with a ``register`` function.

``register(subparsers)`` adds the command's parser and sets ``func`` (called with the parsed
namespace, returning an exit code). Commands under ``specs bench`` register on the bench
sub-parsers instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path

from specs_metric import __version__

# Top-level commands, in the order ``specs --help`` lists them.
COMMANDS = [
    "score",
    "models",
    "convert",
    "prepare",
    "train",
    "compare",
    "sweep",
    "explain",
    "synth",
]
# Sub-commands of ``specs bench``.
BENCH_COMMANDS: list[str] = ["human", "intrinsic", "retrieval", "zeroshot", "details"]


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit 2, as argparse does)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full ``specs`` argument parser."""
    parser = OneLineParser(
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


# Options naming what a command writes, for errors that carry no file name (ENOSPC).
_OUTPUT_OPTIONS = ("output", "out", "json")


def _command_name(args: argparse.Namespace) -> str:
    bench = getattr(args, "bench_command", None)
    return f"{args.command} {bench}" if bench else str(args.command)


def describe_os_error(exc: OSError, args: argparse.Namespace | None = None) -> str:
    """One line for an operating-system error: what failed and on which file.

    A failed ``write`` (disk full, quota) carries no file name; the command's output
    option then names where it was writing.
    """
    if exc.errno is None or not exc.strerror:
        return str(exc)
    what = exc.strerror
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what += " (the output must go to a folder you can write to)"
    elif exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what += " (free some space or write elsewhere)"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        what += " (a part of the path is a file, not a folder)"
    if exc.filename is not None:
        names = [os.fsdecode(exc.filename)]
        if exc.filename2 is not None:
            names.append(os.fsdecode(exc.filename2))
        return f"{what} ({' -> '.join(names)})"
    outputs = [
        str(getattr(args, name))
        for name in _OUTPUT_OPTIONS
        if isinstance(getattr(args, name, None), (str, Path))
    ]
    return f"{what} (while writing {', '.join(outputs)})" if outputs else what


def check_output_locations(args: argparse.Namespace) -> None:
    """Before any work: every output option must lie under a folder that can be written.

    A long job would otherwise compute everything and then fail on its first write. Only
    existing ancestors are checked; missing folders are created by the command later.
    """
    for name in _OUTPUT_OPTIONS:
        value = getattr(args, name, None)
        if not isinstance(value, (str, Path)) or not str(value):
            continue
        folder = Path(value).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specs`` console script.

    Errors caused by the user's input or the machine (a missing file, an unusable checkpoint,
    a model that cannot be downloaded, a bad value, a read-only or full disk) print one line
    and exit with status 2; any other exception is a bug and keeps its traceback. Set
    ``SPECS_DEBUG=1`` for the traceback of every error.
    """
    from specs_metric.checkpoint import CheckpointError
    from specs_metric.distributed import is_initialized, shutdown
    from specs_metric.pretrained import ModelNotAvailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    group_was_open = is_initialized()  # a caller's group is the caller's to close
    succeeded = False
    try:
        check_output_locations(args)
        code = int(args.func(args) or 0)
        succeeded = True
        return code
    except (CheckpointError, ModelNotAvailableError, OSError, ValueError) as exc:
        if os.environ.get("SPECS_DEBUG") == "1":
            raise
        message = describe_os_error(exc, args) if isinstance(exc, OSError) else str(exc)
        # One line: a message that spans lines (a wrapped library error) is joined.
        message = " ".join(message.split())
        print(f"specs {_command_name(args)}: error: {message}", file=sys.stderr)
        return 2
    finally:
        # Under torchrun, ranks leave together so that none aborts on a closed connection.
        if not group_was_open:
            shutdown(wait=succeeded)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
