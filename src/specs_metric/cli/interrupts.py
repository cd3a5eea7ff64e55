"""How a command ends when it is stopped: Ctrl-C, ``kill`` (SIGTERM) or a dead worker.

A stopped job keeps what it wrote (part files are flushed after every chunk), so the one
line the user sees says how to go on: the same command with ``--resume``. SIGTERM is turned
into the same exit path as Ctrl-C, so both end with that line instead of a traceback (or,
for SIGTERM, no message at all).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C would raise ``KeyboardInterrupt``."""


# Exit statuses of a command stopped by a signal: 128 + its number, as shells report them.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_hint(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """What to run to go on after a stop: the same command line with ``--resume`` for
    commands that resume (``--resume latest`` for ``specs train``), else run it again."""
    if not hasattr(args, "resume"):
        return "run the command again to start over"
    words = list(argv)
    if "--resume" not in words and not any(w.startswith("--resume=") for w in words):
        words += ["--resume", "latest"] if args.command == "train" else ["--resume"]
    return f"the work done so far is kept; continue with: specs {shlex.join(words)}"
