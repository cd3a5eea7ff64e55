"""``specs models``: list the named models (and whether they are cached), or the
architecture names ``--arch`` accepts."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models", help="list named models (and which are cached) or --arch names"
    )
    p.add_argument(
        "--archs", action="store_true", help="list the architecture names of --arch instead"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.archs:
        from specs_metric.models.archs import ARCHS

        width = max(len(name) for name in ARCHS)
        for arch in ARCHS.values():
            print(f"{arch.name:<{width}}  {arch.description}")
        return 0
    from specs_metric.models.weights.pretrained import REGISTRY, is_cached

    width = max(len(name) for name in REGISTRY)
    for entry in REGISTRY.values():
        try:
            state = "cached" if is_cached(entry) else "not cached"
        except Exception:  # a damaged cache must not break the listing
            state = "unknown"
        print(
            f"{entry.name:<{width}}  {entry.description}\n{'':<{width}}  source: "
            f"{entry.source} ({state}; arch {entry.arch})"
        )
    return 0
