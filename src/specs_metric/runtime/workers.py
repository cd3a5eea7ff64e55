"""DataLoader workers that die with the process that started them.

A worker blocked on a full pipe never notices that its parent is gone, so after ``kill -9``
of a job its workers would live on, holding memory. :func:`die_with_parent` (a
``worker_init_fn``) asks Linux to send the worker SIGKILL when its parent exits
(``PR_SET_PDEATHSIG``) and, as a fallback where that is unavailable, starts a thread that
watches the parent pid.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
WATCH_SECONDS = 0.5  # how often the fallback thread checks the parent


def _set_parent_death_signal() -> bool:
    """Ask the kernel for SIGKILL when the parent exits; ``False`` if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(_worker_id: int = 0) -> None:
    """Make this (worker) process exit when its parent does; use as ``worker_init_fn``."""
    # Ctrl-C reaches the whole process group: the main process handles it (and tells the
    # user how to resume); a worker just ends with it, silently.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started_by = multiprocessing.parent_process()  # known even if it has already died
    parent = started_by.pid if started_by is not None and started_by.pid else os.getppid()
    _set_parent_death_signal()
    # The parent may have died before prctl took effect; the watcher also covers systems
    # without prctl (it notices the re-parenting to another pid).
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
