"""``specs bench zeroshot``: zero-shot classification accuracy with prompt ensembling."""

from __future__ import annotations

import argparse
import sys

from specs_metric.cli.bench_retrieval import (
    add_common_arguments,
    embed_options,
    evaluate_models,
    finish,
    parse_ks,
    print_table,
    run_meta,
    setup,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from specs_metric.evaluation.templates import TEMPLATES, class_set_names

    p = subparsers.add_parser(
        "zeroshot",
        help="zero-shot classification top-1/top-5 accuracy with prompt templates",
        description=(
            "Classify images by the cosine of their embedding with class embeddings (the "
            "normalised mean of the normalised embeddings of every template filled with "
            "the class name). Data: an ImageFolder directory root/<class>/<image> or a "
            "table with image + label. Works under torchrun (embedding is sharded)."
        ),
    )
    add_common_arguments(p)
    p.add_argument(
        "--classes",
        help=(
            "class names: a file (one per line, 'key<TAB>name' lines, a JSON list or a "
            f"JSON object key -> name) or a set: {', '.join(class_set_names())}. "
            "Default: the folder names / labels found in the data"
        ),
    )
    p.add_argument(
        "--templates",
        default="photo",
        help=(
            f"prompt templates: a set ({', '.join(TEMPLATES)}), a file (one per line or "
            "a JSON list) or one template with {} (default photo)"
        ),
    )
    p.add_argument(
        "--label-column",
        default="label",
        help="label column of a table; dots walk into nested/JSON fields, e.g. "
        "scene.background (default label)",
    )
    p.add_argument("--ks", default="1,5", help="comma-separated K values (default 1,5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specs_metric.evaluation.templates import get_templates
    from specs_metric.evaluation.zeroshot import evaluate_zeroshot, read_labelled

    ks = parse_ks(args.ks)
    templates = get_templates(args.templates)
    info, device = setup(args)
    data = read_labelled(
        args.data,
        args.classes,
        image_column=args.image_column,
        label_column=args.label_column,
        split=args.split,
        image_root=args.image_root,
    )
    if args.limit is not None:
        data = data.head(args.limit)
    if info.is_main:
        print(
            f"{len(data)} images, {len(data.class_names)} classes, {len(templates)} "
            f"template(s) from {data.source}"
        )
        if max(ks) >= len(data.class_names):
            print(f"note: top-{max(ks)} of {len(data.class_names)} classes", file=sys.stderr)
    header = {
        "benchmark": "zeroshot",
        **run_meta(args, info),
        "label_column": args.label_column,
        "classes": data.class_names,
        "templates": list(templates),
        "tie_rule": "rank = #higher + #equal with a smaller class index",
    }
    rows = evaluate_models(
        args,
        info,
        device,
        header,
        lambda scorer: evaluate_zeroshot(
            scorer,
            data,
            templates,
            info,
            ks=ks,
            **embed_options(args),
        ),
    )
    if not info.is_main:
        return 0
    print_table(
        rows,
        [f"top-{k}" for k in ks] + ["per-class"],
        lambda res: [res.accuracy[k] for k in ks] + [res.mean_per_class],
    )
    finish(args)
    return 0
