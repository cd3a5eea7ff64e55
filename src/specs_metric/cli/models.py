"""``specs models``: list the named models."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list named models and where they come from")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.pretrained import REGISTRY

    width = max(len(name) for name in REGISTRY)
    for entry in REGISTRY.values():
        print(f"{entry.name:<{width}}  {entry.description}\n{'':<{width}}  source: {entry.source}")
    return 0
