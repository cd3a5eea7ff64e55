"""Readers of human-judgment data sets for ``specs bench human``.

Each supported data set becomes :class:`JudgmentSet` objects (one per judged dimension) of
:class:`Judgment` rows; the file layouts are described in ``docs/meta-evaluation.md``.
Images stored as bytes stay in memory (never written to disk), one object per image, so
rows of the same image share its bytes. Problems raise
:class:`~specs_metric.errors.DataError` naming the file and row.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specs_metric.data.images import image_source
from specs_metric.errors import DataError, UsageError, reading
from specs_metric.io.jsonio import read_jsonl
from specs_metric.io.reading import open_text, parquet_file

FORMATS = ("generic", "longcap-arena", "detailcaps", "flickr8k-expert", "flickr8k-cf")

ImageRef = str | bytes


DataFormatError = DataError  # the former name of this reader's layout error


@dataclass
class Judgment:
    """One human-judged caption."""

    id: str
    image: ImageRef  # resolved file path, or encoded image bytes
    image_key: str  # identifies the image (bootstrap resamples these)
    caption: str
    human_score: float
    references: tuple[str, ...] = ()
    group: str | None = None  # captions compared with each other (pairwise accuracy)


@dataclass
class JudgmentSet:
    """The judgments of one data set and dimension, e.g. LongCap-Arena ``test.desc``."""

    name: str
    rows: list[Judgment]

    @property
    def has_references(self) -> bool:
        return bool(self.rows) and all(r.references for r in self.rows)

    @property
    def has_groups(self) -> bool:
        return any(r.group is not None for r in self.rows)


def _as_float(value: object, where: str, column: str) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{where}: {column} is not a number: {value!r}") from None
    if not math.isfinite(out):
        raise DataError(f"{where}: {column} is not finite: {value!r}")
    return out


def _as_caption(value: object, where: str, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {column} must be a non-empty string, got {value!r}")
    return value


def _as_references(value: object, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # a JSON list inside a CSV cell
            with reading(where, what="references is not a JSON list"):
                value = json.loads(text)
        else:
            return (text,)
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise DataError(f"{where}: references must be a list of strings")
    refs = tuple(str(r) for r in value if isinstance(r, str) and r.strip())
    if len(refs) != len(value):
        raise DataError(f"{where}: references must be non-empty strings")
    return refs


def _image_once(
    cache: dict[str, ImageRef], key: str, get_raw: Callable[[], object], root: Path, where: str
) -> ImageRef:
    """One object per image, read once, so that rows of the same image share its bytes."""
    if key not in cache:
        cache[key] = image_source(get_raw(), root, where)
    return cache[key]


def read_generic(path: Path, image_root: Path | None = None) -> list[JudgmentSet]:
    """JSONL or CSV rows: ``image``, ``caption``, ``human_score``, optional ``references``,
    ``group`` and ``id``. Relative image paths are resolved against ``image_root`` (default:
    the file's folder)."""
    root = image_root or path.parent
    suffix = path.suffix.lower()
    records: list[tuple[str, dict]] = []
    if suffix == ".csv":
        with open_text(path, what="data file", newline="") as fh, reading(path):
            for i, rec in enumerate(csv.DictReader(fh)):
                records.append((f"{path}:{i + 2}", rec))
    elif suffix in (".jsonl", ".ndjson"):
        with reading(path):  # deep nesting, huge numbers: what read_jsonl leaves to us
            for i, rec in read_jsonl(path, where="{path}:{line}", objects=True):
                records.append((f"{path}:{i}", rec))
    else:
        raise DataError(f"{path}: generic judgments must be .jsonl or .csv")
    images: dict[str, ImageRef] = {}
    rows = []
    for n, (where, rec) in enumerate(records):
        for col in ("image", "caption", "human_score"):
            if col not in rec:
                raise DataError(f"{where}: missing column {col!r}")
        image = image_source(rec["image"], root, where)
        key = image if isinstance(image, str) else f"row{n}"
        group = rec.get("group")
        rows.append(
            Judgment(
                id=str(rec.get("id", n)),
                image=images.setdefault(key, image),
                image_key=key,
                caption=_as_caption(rec["caption"], where, "caption"),
                human_score=_as_float(rec["human_score"], where, "human_score"),
                references=_as_references(rec.get("references"), where),
                group=None if group in (None, "") else str(group),
            )
        )
    if not rows:
        raise DataError(f"{path}: no rows")
    return [JudgmentSet(path.stem, rows)]


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise DataError(f"{path}: no .parquet files found")
    return files


def _iter_parquet(path: Path, lazy: str = "image", batch_rows: int = 256):
    """Yield ``(row number, record, get_lazy)`` batch by batch.

    The ``lazy`` column (the image bytes) is converted to Python only when ``get_lazy()`` is
    called, so rows repeating an image already read cost no copy of its bytes.
    """
    import pyarrow as pa

    try:
        batches = parquet_file(path).iter_batches(batch_size=batch_rows)
        row = 0
        for batch in batches:
            names = [n for n in batch.schema.names if n != lazy]
            cols = {n: batch.column(n).to_pylist() for n in names}
            lazy_col = batch.column(lazy) if lazy in batch.schema.names else None
            for i in range(batch.num_rows):
                rec = {n: cols[n][i] for n in names}
                yield row, rec, (lambda c=lazy_col, i=i: None if c is None else c[i].as_py())
                row += 1
    except (OSError, pa.ArrowException) as err:  # unreadable or corrupt file
        raise DataError(f"{path}: cannot read parquet ({err})") from None


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read parquet ({err})") from None


_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def longcap_split_name(path: Path) -> str:
    """``data/test.desc-00000-of-00001.parquet`` -> ``test.desc``."""
    return _SHARD.sub("", path.stem)


def read_longcap_arena(
    path: Path, split: str | None = "test", image_root: Path | None = None
) -> list[JudgmentSet]:
    """LongCap-Arena: parquet files named ``<split>.<dimension>[-NNNNN-of-NNNNN].parquet``
    (dimension ``desc``, ``rel`` or ``flu``), rows ``file_name``, ``image``, ``refs``, ``cand``,
    ``score``. ``split=None`` reads every split found."""
    root = image_root or (path if path.is_dir() else path.parent)
    by_split: dict[str, list[Path]] = {}
    for f in _parquet_files(path):
        by_split.setdefault(longcap_split_name(f), []).append(f)
    if split is not None and path.is_dir():
        wanted = {k: v for k, v in by_split.items() if k == split or k.startswith(split + ".")}
        if not wanted:
            raise DataError(
                f"{path}: no split {split!r}; found {', '.join(sorted(by_split))}"
            )
        by_split = wanted
    images: dict[str, ImageRef] = {}
    sets = []
    for name, files in sorted(by_split.items()):
        rows = []
        for f in files:
            missing = {"file_name", "image", "refs", "cand", "score"} - set(_parquet_columns(f))
            if missing:
                raise DataError(f"{f}: missing column(s) {', '.join(sorted(missing))}")
            for i, rec, get_image in _iter_parquet(f):
                where = f"{f} row {i}"
                key = str(rec["file_name"])
                image = _image_once(images, key, get_image, root, where)
                rows.append(
                    Judgment(
                        id=f"{name}:{len(rows)}",
                        image=image,
                        image_key=key,
                        caption=_as_caption(rec["cand"], where, "cand"),
                        human_score=_as_float(rec["score"], where, "score"),
                        references=_as_references(rec["refs"], where),
                        group=key,
                    )
                )
        sets.append(JudgmentSet(f"longcap-arena/{name}", rows))
    return sets


DETAILCAPS_ID_COLUMNS = ("image_id", "id", "file_name", "image_name", "source")


def detailcaps_candidates(columns: Sequence[str]) -> dict[str, str]:
    """Caption column -> score column pairs found by name: ``X`` with ``X_score``."""
    names = set(columns)
    return {c[: -len("_score")]: c for c in columns if c.endswith("_score") and c[:-6] in names}


def read_detailcaps(
    path: Path,
    candidates: dict[str, str] | None = None,
    reference_prefix: str = "GT_Caption",
    image_root: Path | None = None,
) -> list[JudgmentSet]:
    """DetailCaps-4870: one parquet row per image with ``image`` (bytes), reference
    columns ``GT_Caption_*`` and candidate captions ``X`` judged in ``X_score`` columns.

    Args:
        candidates: Caption column -> score column; found by name when not given.
        reference_prefix: Columns starting with it are the reference captions.
    """
    root = image_root or (path if path.is_dir() else path.parent)
    images: dict[str, ImageRef] = {}
    rows: list[Judgment] = []
    for f in _parquet_files(path):
        columns = _parquet_columns(f)
        pairs = candidates or detailcaps_candidates(columns)
        if not pairs:
            raise DataError(
                f"{f}: no candidate columns (caption X with score X_score); "
                f"columns are {', '.join(columns)}; name them with --candidates CAPTION:SCORE"
            )
        missing = ({"image"} | set(pairs) | set(pairs.values())) - set(columns)
        if missing:
            raise DataError(f"{f}: missing column(s) {', '.join(sorted(missing))}")
        ref_cols = [c for c in columns if c.startswith(reference_prefix)]
        id_col = next((c for c in DETAILCAPS_ID_COLUMNS if c in columns), None)
        for i, rec, get_image in _iter_parquet(f):
            where = f"{f} row {i}"
            key = f"{f.name}:{rec[id_col] if id_col else i}"
            image = _image_once(images, key, get_image, root, where)
            refs = tuple(r for c in ref_cols if isinstance(r := rec.get(c), str) and r.strip())
            for cap_col, score_col in pairs.items():
                if rec.get(cap_col) is None or rec.get(score_col) is None:
                    continue  # this captioner was not judged on this image
                rows.append(
                    Judgment(
                        id=f"{key}:{cap_col}",
                        image=image,
                        image_key=key,
                        caption=_as_caption(rec[cap_col], where, cap_col),
                        human_score=_as_float(rec[score_col], where, score_col),
                        references=refs,
                        group=key,
                    )
                )
    if not rows:
        raise DataError(f"{path}: no judged candidates")
    return [JudgmentSet("detailcaps", rows)]


FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")


def _flickr_tokens(folder: Path) -> dict[str, str]:
    token_file = folder / "Flickr8k.token.txt"
    if not token_file.is_file():
        raise DataError(f"{folder}: Flickr8k.token.txt (the captions) is missing")
    captions = {}
    with open_text(token_file, what="data file") as fh, reading(token_file):
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or "#" not in parts[0]:
                raise DataError(f"{token_file}:{n}: expected 'IMAGE.jpg#K<TAB>caption'")
            captions[parts[0]] = parts[1].strip()
    return captions


def read_flickr8k(
    path: Path,
    kind: str = "expert",
    image_root: Path | None = None,
    aggregate: str = "each",
) -> list[JudgmentSet]:
    """Flickr8k-Expert (``ExpertAnnotations.txt``: image, caption id, three expert scores 1-4)
    or Flickr8k-CF (``CrowdFlowerAnnotations.txt``: image, caption id, fraction of "yes",
    yes count, no count), with captions from ``Flickr8k.token.txt``.

    The references of a candidate are the captions of its image other than the candidate
    itself. ``aggregate="each"`` makes every expert judgment a row (the usual protocol);
    ``"mean"`` averages them.
    """
    if kind not in ("expert", "cf"):
        raise UsageError(f"kind must be 'expert' or 'cf', got {kind!r}")
    if aggregate not in ("each", "mean"):
        raise UsageError(f"aggregate must be 'each' or 'mean', got {aggregate!r}")
    folder = path if path.is_dir() else path.parent
    name = "ExpertAnnotations.txt" if kind == "expert" else "CrowdFlowerAnnotations.txt"
    ann = path if path.is_file() else folder / name
    if not ann.is_file():
        raise DataError(f"{folder}: {name} is missing")
    captions = _flickr_tokens(folder)
    by_image: dict[str, list[str]] = {}
    for cid in captions:
        by_image.setdefault(cid.split("#")[0], []).append(cid)
    if image_root is None:
        dirs = [folder / d for d in FLICKR8K_IMAGE_DIRS if (folder / d).is_dir()]
        image_root = dirs[0] if dirs else folder
    rows: list[Judgment] = []
    with open_text(ann, what="data file") as fh, reading(ann):
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{ann}:{n}"
            parts = line.split()
            if len(parts) < (5 if kind == "expert" else 3):
                raise DataError(f"{where}: too few columns")
            image_id, caption_id = parts[0], parts[1]
            if caption_id not in captions:
                raise DataError(f"{where}: caption {caption_id} not in Flickr8k.token.txt")
            if kind == "expert":
                scores = [_as_float(s, where, "expert score") for s in parts[2:5]]
                if aggregate == "mean":
                    scores = [float(np.mean(scores))]
            else:
                scores = [_as_float(parts[2], where, "fraction yes")]
            refs = tuple(captions[c] for c in by_image.get(image_id, []) if c != caption_id)
            for k, s in enumerate(scores):
                rows.append(
                    Judgment(
                        id=f"{n}:{k}",
                        image=str(image_root / image_id),
                        image_key=image_id,
                        caption=captions[caption_id],
                        human_score=s,
                        references=refs,
                        group=image_id,
                    )
                )
    if not rows:
        raise DataError(f"{ann}: no judgments")
    return [JudgmentSet(f"flickr8k-{kind}", rows)]


def read_judgments(
    path: str | Path,
    fmt: str,
    *,
    split: str | None = "test",
    image_root: str | Path | None = None,
    candidates: dict[str, str] | None = None,
    aggregate: str = "each",
) -> list[JudgmentSet]:
    """Read a human-judgment data set in one of :data:`FORMATS`."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    if fmt == "generic":
        return read_generic(path, root)
    if fmt == "longcap-arena":
        return read_longcap_arena(path, split, root)
    if fmt == "detailcaps":
        return read_detailcaps(path, candidates, image_root=root)
    if fmt in ("flickr8k-expert", "flickr8k-cf"):
        return read_flickr8k(path, fmt.split("-")[1], root, aggregate)
    raise UsageError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
