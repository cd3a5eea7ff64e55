"""Tick labels that never overlap: shortened, then turned upright, then thinned.

A sweep of many checkpoints names each one under its point (``ckpt-1000``, ``ckpt-2000``,
...). Horizontal labels that run into each other cannot be read, so the plot lays them out
in steps, measuring the drawn labels with matplotlib's renderer after each:

1. the prefix every name shares is shown once in the axis label (:func:`short_names`);
2. labels that still overlap are turned upright (their boxes are then one line high);
3. labels that still overlap (hundreds of checkpoints) are thinned: every k-th is shown,
   with the smallest k that leaves no two overlapping.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def _boundary(names: Sequence[str], k: int) -> bool:
    """Whether cutting every name at ``k`` splits no word or number."""
    for name in names:
        if k >= len(name):
            return False
        before, after = name[k - 1], name[k]
        if (before.isdigit() and after.isdigit()) or (before.isalpha() and after.isalpha()):
            return False
    return True


def short_names(names: Sequence[str]) -> tuple[str, list[str]]:
    """The prefix all ``names`` share, cut where no word or number is split, and the names
    without it (``("", names)`` when there is none or one name).

    Example:
        >>> short_names(["ckpt-1000", "ckpt-2000", "ckpt-10000"])
        ('ckpt-', ['1000', '2000', '10000'])
        >>> short_names(["step1", "step12"]), short_names(["early", "late"])
        (('step', ['1', '12']), ('', ['early', 'late']))
    """
    names = list(names)
    if len(names) < 2:
        return "", names
    k = len(os.path.commonprefix(names))
    while k > 0 and not _boundary(names, k):
        k -= 1
    return names[0][:k], [name[k:] for name in names]


def overlapping_labels(fig, labels) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty ``labels`` whose drawn boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    shown = [t for t in labels if t.get_visible() and t.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in shown]
    return [
        (a, b)
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if box_a.overlaps(box_b)
    ]


def fit_tick_labels(fig, ax) -> None:
    """Lay out ``ax``'s x tick labels so that no two overlap (see the module docstring);
    the figure's layout is tightened around them."""
    names = [t.get_text() for t in ax.get_xticklabels()]
    size = ax.get_xticklabels()[0].get_fontsize() if names else None
    fig.tight_layout()
    if not overlapping_labels(fig, ax.get_xticklabels()):
        return
    ax.tick_params(axis="x", labelrotation=90)
    fig.tight_layout()
    if not overlapping_labels(fig, ax.get_xticklabels()):
        return
    for step in range(2, len(names) + 1):
        thinned = [n if i % step == 0 else "" for i, n in enumerate(names)]
        ax.set_xticklabels(thinned, fontsize=size)
        fig.tight_layout()
        if not overlapping_labels(fig, ax.get_xticklabels()):
            return
