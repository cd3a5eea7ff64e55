"""Writing a synthetic data set to disk, byte for byte reproducibly.

Layout of ``DIR``:

* ``images/{split}_{index:06d}.png``: the rendered scenes;
* ``train.parquet``, ``test.parquet``: the sDCI layout, one row per scene with ``id``,
  ``image`` (path relative to ``DIR``), ``caption`` (the full description, as the
  training data of ``specs prepare`` has it), ``captions`` (``c_1..c_n``), ``neg_captions``
  (``n_2..n_n``; ``neg_captions[j]`` extends ``captions[j]`` and pairs with
  ``captions[j + 1]``) and ``scene`` (the scene graph as JSON);
* ``graded_train.jsonl``, ``graded_test.jsonl``: one graded candidate per line with
  ``image``, ``caption``, ``human_score`` (fact-level F1), ``group`` (the scene id) and the
  counts ``n_facts``, ``n_correct``, ``n_missing``, ``n_hallucinated``;
* ``world.json``: the generation arguments and the world's fixed parameters.

The same arguments give the same bytes: every scene draws from its own seeded stream,
PNG files carry no time stamps and parquet files no creation metadata besides the
writer's version string.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from specs_metric.errors import OutputError, UsageError
from specs_metric.io.writing import atomic_write, write_text
from specs_metric.processing.tokenizer import default_tokenizer
from specs_metric.synth import world
from specs_metric.synth.captions import (
    GRADED_PER_SCENE,
    SceneContext,
    TokenCounter,
    build_chain,
    describe,
    graded_candidates,
)
from specs_metric.synth.render import render_scene
from specs_metric.synth.world import Split, sample_scene, scene_rng

SPLITS: tuple[Split, ...] = ("train", "test")


@dataclass
class SplitSummary:
    """What was written for one split."""

    split: str
    scenes: int
    captions: int
    negatives: int
    graded: int
    tokens_min: int
    tokens_max: int


def _split_sizes(n: int, test_fraction: float) -> dict[str, int]:
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if not 0.0 <= test_fraction <= 1.0:
        raise UsageError(f"--test-fraction must be in [0, 1], got {test_fraction}")
    n_test = int(round(n * test_fraction))
    return {"train": n - n_test, "test": n_test}


def _write_split(
    output: Path,
    split: Split,
    count: int,
    seed: int,
    image_size: int,
    graded_per_scene: int,
    bar: tqdm,
) -> SplitSummary:
    counter = TokenCounter(default_tokenizer())
    split_id = SPLITS.index(split)
    scenes, descriptions = [], []
    for i in range(count):
        rng = scene_rng(seed, split, i)
        scene = sample_scene(rng, split)
        scenes.append(scene)
        descriptions.append(describe(scene, rng, counter))
    pool = [d.facts for d in descriptions]

    columns = ("id", "image", "caption", "captions", "neg_captions", "scene")
    rows: dict[str, list] = {k: [] for k in columns}
    graded_lines: list[str] = []
    lengths: list[int] = []
    for i, (scene, desc) in enumerate(zip(scenes, descriptions, strict=True)):
        scene_id = f"{split}_{i:06d}"
        image = f"images/{scene_id}.png"
        with atomic_write(output / image, "wb") as fh:
            render_scene(scene, image_size).save(fh, format="PNG")
        ctx = SceneContext(desc, scene, pool, i, split, counter)
        chain = build_chain(ctx, np.random.default_rng([seed, split_id, i, 1]))
        rows["id"].append(scene_id)
        rows["image"].append(image)
        rows["caption"].append(chain.captions[-1])
        rows["captions"].append(chain.captions)
        rows["neg_captions"].append(chain.neg_captions)
        rows["scene"].append(json.dumps(scene.to_dict(), sort_keys=True))
        lengths.append(2 + sum(desc.lengths))
        bar.update(1)
        graded_rng = np.random.default_rng([seed, split_id, i, 2])
        for cand in graded_candidates(ctx, graded_rng, graded_per_scene):
            record = {
                "image": image,
                "caption": cand.caption,
                "human_score": cand.score,
                "group": scene_id,
                "n_facts": cand.n_facts,
                "n_correct": cand.n_correct,
                "n_missing": cand.n_missing,
                "n_hallucinated": cand.n_hallucinated,
            }
            graded_lines.append(json.dumps(record, sort_keys=True))

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.string()),
            ("caption", pa.string()),
            ("captions", pa.list_(pa.string())),
            ("neg_captions", pa.list_(pa.string())),
            ("scene", pa.string()),
        ]
    )
    table = pa.table(rows, schema=schema)
    with atomic_write(output / f"{split}.parquet", "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
    write_text(
        output / f"graded_{split}.jsonl",
        "".join(line + "\n" for line in graded_lines), encoding="utf-8"
    )
    return SplitSummary(
        split=split,
        scenes=count,
        captions=sum(len(c) for c in rows["captions"]),
        negatives=sum(len(c) for c in rows["neg_captions"]),
        graded=len(graded_lines),
        tokens_min=min(lengths, default=0),
        tokens_max=max(lengths, default=0),
    )


_OWNED_IMAGE = re.compile(r"(?:train|test)_\d{6}\.png")


def owned_files(output: Path) -> list[Path]:
    """The files of this layout already in ``output`` (what an overwrite replaces)."""
    top = ["world.json", *(f"{s}.parquet" for s in SPLITS), *(f"graded_{s}.jsonl" for s in SPLITS)]
    found = [output / name for name in top if (output / name).is_file()]
    images = output / "images"
    if images.is_dir():
        found += sorted(
            p for p in images.iterdir() if _OWNED_IMAGE.fullmatch(p.name) and p.is_file()
        )
    return found


def _clear(output: Path, overwrite: bool) -> None:
    """Make ``output`` ready for a new data set: refuse a used folder unless ``overwrite``,
    and then remove only the files of this layout, so no image of an earlier, larger run
    survives and no other file is touched."""
    if not output.is_dir():
        return
    if not overwrite and any(output.iterdir()):
        raise OutputError(
            f"{output} is not empty; pass --overwrite to replace a data set written there "
            "(only its own files are removed), or choose an empty folder"
        )
    for path in owned_files(output):
        path.unlink()


def world_parameters() -> dict:
    """The fixed parameters of the world (written to ``world.json``)."""
    return {
        "colours": dict(world.COLOURS.items()),
        "shapes": list(world.SHAPES),
        "sizes": dict(world.SIZE_RADIUS.items()),
        "textures": list(world.TEXTURES),
        "positions": list(world.POSITIONS),
        "relations": list(world.RELATIONS),
        "objects_per_scene": [world.MIN_OBJECTS, world.MAX_OBJECTS],
        "max_relations": world.MAX_RELATIONS,
        "held_out_pairs": [list(p) for p in world.HELD_OUT_PAIRS],
    }


def generate(
    output: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    test_fraction: float = 0.2,
    graded_per_scene: int = GRADED_PER_SCENE,
    *,
    overwrite: bool = True,
    progress: bool = False,
) -> list[SplitSummary]:
    """Generate ``n`` scenes (``round(n * test_fraction)`` of them test scenes) into ``output``.

    Args:
        output: directory to create or fill. Files of the layout already there (an
            earlier data set) are removed first; other files are left alone.
        n: total number of scenes.
        seed: the world's seed; the same arguments give byte-identical files.
        image_size: side of the square images in pixels (at least 16).
        test_fraction: share of test scenes.
        graded_per_scene: graded candidates per scene.
        overwrite: with ``False``, refuse (``OutputError``) a folder that is not empty.
        progress: show a progress bar of the scenes written.

    Returns:
        One summary per split.
    """
    if image_size < 16:
        raise UsageError(f"--image-size must be at least 16 pixels, got {image_size}")
    if graded_per_scene < 0:
        raise UsageError(f"--graded-per-scene must be >= 0, got {graded_per_scene}")
    sizes = _split_sizes(n, test_fraction)
    output = Path(output)
    _clear(output, overwrite)
    (output / "images").mkdir(parents=True, exist_ok=True)
    with tqdm(total=n, unit="scene", desc="synth", file=sys.stderr, disable=not progress) as bar:
        summaries = [
            _write_split(output, split, sizes[split], seed, image_size, graded_per_scene, bar)
            for split in SPLITS
        ]
    meta = {
        "seed": seed,
        "n": n,
        "test_fraction": test_fraction,
        "image_size": image_size,
        "graded_per_scene": graded_per_scene,
        "splits": {s.split: s.scenes for s in summaries},
        "world": world_parameters(),
    }
    write_text(output / "world.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return summaries
