"""``python -m specs_metric.integrations.lmms_eval``: print the task folder for lmms-eval's
``--include_path``; ``... task --out DIR ...``: write a task folder for another data set."""

from __future__ import annotations

import argparse
import sys

from specs_metric.errors import SpecsError
from specs_metric.integrations.lmms_eval import (
    DEFAULT_PROMPT,
    TaskConfig,
    task_dir,
    write_task,
)
from specs_metric.scoring.scales import SCALES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m specs_metric.integrations.lmms_eval",
        description="Without arguments: print the folder of the shipped task specs_detailcaps "
        "(DetailCaps-4870) for lmms-eval's --include_path. `task`: write a task folder for "
        "another data set with an image column and an id column, and print its path.",
    )
    sub = ap.add_subparsers(dest="command")
    t = sub.add_parser("task", help="write a task folder for another data set")
    t.add_argument("--out", required=True, help="folder to write (the --include_path)")
    t.add_argument("--name", required=True, help="the task's name (lmms-eval --tasks NAME)")
    t.add_argument("--dataset", required=True,
                   help="HF dataset id, or a folder written by datasets' save_to_disk "
                   "(with --from-disk; give an absolute path)")  # fmt: skip
    t.add_argument("--from-disk", action="store_true", help="load --dataset with load_from_disk")
    t.add_argument("--split", default="test", help="split to evaluate (test)")
    t.add_argument("--image-column", default="binary",
                   help="image column: bytes, an Image feature or a path (binary)")  # fmt: skip
    t.add_argument("--id-column", default="image",
                   help="image id column, the bootstrap's unit (image)")  # fmt: skip
    t.add_argument("--model", help="SPECS model (default: $SPECS_MODEL, else specs-b32)")
    t.add_argument("--device", help="device of the SPECS model (default: $SPECS_DEVICE, auto)")
    t.add_argument("--scale", default="specs", choices=SCALES)
    t.add_argument("--prompt", default=DEFAULT_PROMPT)
    t.add_argument("--max-new-tokens", type=int, default=1024)
    t.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (1000)")
    t.add_argument("--level", type=float, default=0.95, help="confidence level (0.95)")
    args = ap.parse_args(argv)
    if args.command is None:
        print(task_dir())
        return 0
    config = TaskConfig(model=args.model, device=args.device, scale=args.scale,
                        image_column=args.image_column, id_column=args.id_column,
                        n_boot=args.n_boot, level=args.level)  # fmt: skip
    try:
        folder = write_task(args.out, name=args.name, dataset_path=args.dataset, config=config,
                            split=args.split, from_disk=args.from_disk, prompt=args.prompt,
                            max_new_tokens=args.max_new_tokens)  # fmt: skip
    except (SpecsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
