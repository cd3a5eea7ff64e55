"""Agreement of caption metrics with human judgments (``specs bench human``).

Readers turn each supported data set into :class:`JudgmentSet` objects (one per judged
dimension), :func:`run_metrics` scores every row with each requested metric and times it,
and :func:`evaluate` computes the correlations with bootstrap CIs that resample images.
The file layouts are described in ``docs/meta-evaluation.md``.

Images stored as bytes are decoded in memory (never written to disk); each distinct image
is embedded once per model, and each distinct (image, caption) pair is scored once.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specs_metric.bench import stats
from specs_metric.bench.text_metrics import TEXT_METRICS, text_metric
from specs_metric.scores import SCALES

FORMATS = ("generic", "longcap-arena", "detailcaps", "flickr8k-expert", "flickr8k-cf")
MODEL_SCALES = SCALES  # model metrics are named by their score scale
DEFAULT_MODEL = "specs-b32"

ImageRef = str | bytes


class DataFormatError(ValueError):
    """A judgment file that does not follow its documented layout (names file and row)."""


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


# --------------------------------------------------------------------------------------
# readers


def _resolve_image(value: object, root: Path, where: str) -> ImageRef:
    """A path (relative to ``root``), raw bytes, or a Hugging Face image struct."""
    if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise DataFormatError(f"{where}: image bytes are empty")
        return bytes(value)
    if isinstance(value, str) and value.strip():
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else root / path)
    raise DataFormatError(f"{where}: no image (expected a path, bytes or {{bytes, path}})")


def _as_float(value: object, where: str, column: str) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataFormatError(f"{where}: {column} is not a number: {value!r}") from None
    if not math.isfinite(out):
        raise DataFormatError(f"{where}: {column} is not finite: {value!r}")
    return out


def _as_caption(value: object, where: str, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where}: {column} must be a non-empty string, got {value!r}")
    return value


def _as_references(value: object, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # a JSON list inside a CSV cell
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: references is not a JSON list: {err}") from None
        else:
            return (text,)
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise DataFormatError(f"{where}: references must be a list of strings")
    refs = tuple(str(r) for r in value if isinstance(r, str) and r.strip())
    if len(refs) != len(value):
        raise DataFormatError(f"{where}: references must be non-empty strings")
    return refs


def _image_once(
    cache: dict[str, ImageRef], key: str, get_raw: Callable[[], object], root: Path, where: str
) -> ImageRef:
    """One object per image, read once, so that rows of the same image share its bytes."""
    if key not in cache:
        cache[key] = _resolve_image(get_raw(), root, where)
    return cache[key]


def read_generic(path: Path, image_root: Path | None = None) -> list[JudgmentSet]:
    """JSONL or CSV rows: ``image``, ``caption``, ``human_score``, optional ``references``,
    ``group`` and ``id``. Relative image paths are resolved against ``image_root`` (default:
    the file's folder)."""
    root = image_root or path.parent
    suffix = path.suffix.lower()
    records: list[tuple[str, dict]] = []
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            for i, rec in enumerate(csv.DictReader(fh)):
                records.append((f"{path}:{i + 2}", rec))
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path}:{i}: not valid JSON ({err.msg})") from None
                if not isinstance(rec, dict):
                    raise DataFormatError(f"{path}:{i}: expected a JSON object")
                records.append((f"{path}:{i}", rec))
    else:
        raise DataFormatError(f"{path}: generic judgments must be .jsonl or .csv")
    images: dict[str, ImageRef] = {}
    rows = []
    for n, (where, rec) in enumerate(records):
        for col in ("image", "caption", "human_score"):
            if col not in rec:
                raise DataFormatError(f"{where}: missing column {col!r}")
        image = _resolve_image(rec["image"], root, where)
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
        raise DataFormatError(f"{path}: no rows")
    return [JudgmentSet(path.stem, rows)]


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataFormatError(f"{path}: no such file or folder")
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise DataFormatError(f"{path}: no .parquet files found")
    return files


def _iter_parquet(path: Path, lazy: str = "image", batch_rows: int = 256):
    """Yield ``(row number, record, get_lazy)`` batch by batch.

    The ``lazy`` column (the image bytes) is converted to Python only when ``get_lazy()`` is
    called, so rows repeating an image already read cost no copy of its bytes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
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
        raise DataFormatError(f"{path}: cannot read parquet ({err})") from None


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as err:
        raise DataFormatError(f"{path}: cannot read parquet ({err})") from None


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
            raise DataFormatError(
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
                raise DataFormatError(f"{f}: missing column(s) {', '.join(sorted(missing))}")
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
            raise DataFormatError(
                f"{f}: no candidate columns (caption X with score X_score); "
                f"columns are {', '.join(columns)}; name them with --candidates CAPTION:SCORE"
            )
        missing = ({"image"} | set(pairs) | set(pairs.values())) - set(columns)
        if missing:
            raise DataFormatError(f"{f}: missing column(s) {', '.join(sorted(missing))}")
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
        raise DataFormatError(f"{path}: no judged candidates")
    return [JudgmentSet("detailcaps", rows)]


FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")


def _flickr_tokens(folder: Path) -> dict[str, str]:
    token_file = folder / "Flickr8k.token.txt"
    if not token_file.is_file():
        raise DataFormatError(f"{folder}: Flickr8k.token.txt (the captions) is missing")
    captions = {}
    with open(token_file, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or "#" not in parts[0]:
                raise DataFormatError(f"{token_file}:{n}: expected 'IMAGE.jpg#K<TAB>caption'")
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
        raise ValueError(f"kind must be 'expert' or 'cf', got {kind!r}")
    if aggregate not in ("each", "mean"):
        raise ValueError(f"aggregate must be 'each' or 'mean', got {aggregate!r}")
    folder = path if path.is_dir() else path.parent
    name = "ExpertAnnotations.txt" if kind == "expert" else "CrowdFlowerAnnotations.txt"
    ann = path if path.is_file() else folder / name
    if not ann.is_file():
        raise DataFormatError(f"{folder}: {name} is missing")
    captions = _flickr_tokens(folder)
    by_image: dict[str, list[str]] = {}
    for cid in captions:
        by_image.setdefault(cid.split("#")[0], []).append(cid)
    if image_root is None:
        dirs = [folder / d for d in FLICKR8K_IMAGE_DIRS if (folder / d).is_dir()]
        image_root = dirs[0] if dirs else folder
    rows: list[Judgment] = []
    with open(ann, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{ann}:{n}"
            parts = line.split()
            if len(parts) < (5 if kind == "expert" else 3):
                raise DataFormatError(f"{where}: too few columns")
            image_id, caption_id = parts[0], parts[1]
            if caption_id not in captions:
                raise DataFormatError(f"{where}: caption {caption_id} not in Flickr8k.token.txt")
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
        raise DataFormatError(f"{ann}: no judgments")
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
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------
# metrics


@dataclass(frozen=True)
class MetricSpec:
    """A metric to run: a text metric, or a model checkpoint with a score scale."""

    label: str
    name: str  # one of MODEL_SCALES or TEXT_METRICS
    model: str | None = None  # checkpoint name or path (model metrics only)

    @property
    def is_model(self) -> bool:
        return self.name in MODEL_SCALES


def parse_metrics(text: str, default_model: str = DEFAULT_MODEL) -> list[MetricSpec]:
    """Parse ``[LABEL=]NAME[@MODEL],...``, e.g. ``specs,clip-s@openai.pt,twin=specs@twin.pt``.

    ``NAME`` is a model score scale (:data:`MODEL_SCALES`, using ``MODEL`` or
    ``default_model``) or a text metric (:data:`TEXT_METRICS`).
    """
    specs: list[MetricSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        label, _, body = item.partition("=") if "=" in item else ("", "", item)
        name, _, model = body.partition("@")
        name = name.strip().lower()
        if name in TEXT_METRICS:
            if model:
                raise ValueError(f"--metrics {item!r}: {name} takes no model")
            specs.append(MetricSpec(label or name, name))
        elif name in MODEL_SCALES:
            model = model.strip() or default_model
            specs.append(MetricSpec(label or (name if "@" not in body else body), name, model))
        else:
            choices = ", ".join(MODEL_SCALES + TEXT_METRICS)
            raise ValueError(f"--metrics: unknown metric {name!r} in {item!r}; use {choices}")
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"--metrics: label {dupes[0]!r} used twice; name them LABEL=NAME@MODEL")
    if not specs:
        raise ValueError("--metrics: no metric given")
    return specs


@dataclass
class MetricScores:
    """One metric's scores for every row of a judgment set, and what they cost."""

    spec: MetricSpec
    scores: np.ndarray  # per row; NaN where the row could not be scored
    seconds: float  # scoring time (model loading excluded)
    n_scored: int  # distinct (image, caption) pairs scored
    checkpoint_sha256: str | None = None
    load_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the metric was not run on this set

    @property
    def seconds_per_1000(self) -> float:
        return 1000.0 * self.seconds / self.n_scored if self.n_scored else float("nan")


@dataclass
class _Unique:
    """Distinct scoring units of a set: pairs, images and the row -> pair map."""

    pair_of_row: np.ndarray
    pairs: list[Judgment]  # first row of each distinct pair
    image_keys: list[str]
    image_of_pair: np.ndarray


def _unique(rows: Sequence[Judgment], with_references: bool) -> _Unique:
    pair_ids: dict[tuple, int] = {}
    pairs: list[Judgment] = []
    pair_of_row = np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        key = (r.image_key, r.caption, r.references if with_references else ())
        if key not in pair_ids:
            pair_ids[key] = len(pairs)
            pairs.append(r)
        pair_of_row[i] = pair_ids[key]
    image_ids: dict[str, int] = {}
    image_of_pair = np.empty(len(pairs), dtype=np.int64)
    for j, r in enumerate(pairs):
        image_of_pair[j] = image_ids.setdefault(r.image_key, len(image_ids))
    return _Unique(pair_of_row, pairs, list(image_ids), image_of_pair)


def _embed_images_safely(scorer, images: Sequence[ImageRef], keys: Sequence[str], batch_size: int):
    """Image embeddings with NaN rows (and a message) for images that cannot be decoded."""
    import torch

    from specs_metric.transform import ImageError

    out = torch.full((len(images), scorer.embed_dim), float("nan"))
    errors: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        try:
            out[start : start + len(chunk)] = scorer.embed_images(chunk, batch_size)
        except ImageError:
            for k, img in enumerate(chunk):  # find the bad ones, keep the rest
                try:
                    out[start + k] = scorer.embed_images([img])[0]
                except ImageError as err:
                    errors.append(f"image {keys[start + k]}: {err}")
    return out, errors


def model_cosines(
    scorer, rows: Sequence[Judgment], batch_size: int = 64
) -> tuple[np.ndarray, float, int, list[str]]:
    """Cosine per row from a loaded :class:`~specs_metric.scorer.Scorer`.

    Returns:
        (cosine per row, NaN where the image failed; seconds; distinct pairs; image errors).
    """
    from specs_metric.scores import cosine_similarity

    uniq = _unique(rows, with_references=False)
    first_row_of_image: dict[str, ImageRef] = {}
    for r in uniq.pairs:
        first_row_of_image.setdefault(r.image_key, r.image)
    started = time.perf_counter()
    images = [first_row_of_image[k] for k in uniq.image_keys]
    image_emb, errors = _embed_images_safely(scorer, images, uniq.image_keys, batch_size)
    text_emb = scorer.embed_texts([r.caption for r in uniq.pairs])
    cos = cosine_similarity(image_emb[uniq.image_of_pair], text_emb)
    seconds = time.perf_counter() - started
    return np.asarray(cos, dtype=np.float64)[uniq.pair_of_row], seconds, len(uniq.pairs), errors


def text_scores(name: str, rows: Sequence[Judgment]) -> tuple[np.ndarray, float, int]:
    """(per-row scores, seconds, distinct pairs) of a reference-based text metric."""
    uniq = _unique(rows, with_references=True)
    started = time.perf_counter()
    scores = text_metric(
        name,
        [r.caption for r in uniq.pairs],
        [list(r.references) for r in uniq.pairs],
        documents=[r.image_key for r in uniq.pairs],
    )
    return scores[uniq.pair_of_row], time.perf_counter() - started, len(uniq.pairs)


Loader = Callable[[str], object]


def _default_loader(device: str | None, precision: str) -> Loader:
    def load(model: str):
        from specs_metric.scorer import load as load_scorer

        return load_scorer(model, device=device, precision=precision)

    return load


def run_metrics(
    sets: Sequence[JudgmentSet],
    metrics: Sequence[MetricSpec],
    *,
    loader: Loader | None = None,
    device: str | None = None,
    precision: str = "fp32",
    batch_size: int = 64,
    on_result: Callable[[JudgmentSet, MetricScores], None] | None = None,
) -> dict[str, dict[str, MetricScores]]:
    """Score every set with every metric: ``{set name: {metric label: MetricScores}}``.

    Each checkpoint is loaded once and run once per set; its scales share the cosines (and
    so the timing). ``on_result`` is called after each metric, so results can be written as
    they come.
    """
    from specs_metric.scores import apply_scale

    load = loader or _default_loader(device, precision)
    out: dict[str, dict[str, MetricScores]] = {s.name: {} for s in sets}
    models = sorted({m.model for m in metrics if m.is_model})
    for model in models:
        started = time.perf_counter()
        scorer = load(model)
        load_seconds = time.perf_counter() - started
        for jset in sets:
            cos, seconds, n_pairs, errors = model_cosines(scorer, jset.rows, batch_size)
            for spec in (m for m in metrics if m.model == model):
                scores = np.full(cos.shape, np.nan)
                ok = np.isfinite(cos)
                scores[ok] = apply_scale(cos[ok], spec.name)
                res = MetricScores(
                    spec,
                    scores,
                    seconds,
                    n_pairs,
                    getattr(scorer, "checkpoint_sha256", None),
                    load_seconds,
                    errors,
                )
                out[jset.name][spec.label] = res
                if on_result:
                    on_result(jset, res)
        del scorer
    for spec in (m for m in metrics if not m.is_model):
        for jset in sets:
            if not jset.has_references:
                res = MetricScores(
                    spec,
                    np.full(len(jset.rows), np.nan),
                    0.0,
                    0,
                    skipped="needs references for every row",
                )
            else:
                scores, seconds, n_pairs = text_scores(spec.name, jset.rows)
                res = MetricScores(spec, scores, seconds, n_pairs)
            out[jset.name][spec.label] = res
            if on_result:
                on_result(jset, res)
    # keep the order the metrics were asked for
    return {k: {m.label: v[m.label] for m in metrics} for k, v in out.items()}


# --------------------------------------------------------------------------------------
# correlations


@dataclass
class MetricAgreement:
    """Correlations of one metric with the human scores of one set."""

    label: str
    name: str
    model: str | None
    checkpoint_sha256: str | None
    n_rows: int  # rows used (scored)
    n_failed: int  # rows without a score (e.g. undecodable image)
    correlations: dict[str, stats.Estimate]
    pairwise_accuracy: stats.Estimate | None
    seconds: float
    seconds_per_1000: float
    n_scored: int
    load_seconds: float = 0.0
    skipped: str | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class SetReport:
    """All metrics on one judgment set."""

    name: str
    n_rows: int
    n_images: int
    n_groups: int
    metrics: list[MetricAgreement]
    human: np.ndarray
    scores: dict[str, np.ndarray]
    image_keys: list[str]


def evaluate(
    jset: JudgmentSet,
    results: dict[str, MetricScores],
    *,
    statistics: Sequence[str] = stats.STATISTICS,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> SetReport:
    """Correlations (bootstrap CIs resampling images) and pairwise accuracy per metric."""
    human = np.array([r.human_score for r in jset.rows])
    images = np.array([r.image_key for r in jset.rows], dtype=object)
    groups = [r.group for r in jset.rows]
    agreements = []
    for label, res in results.items():
        ok = np.isfinite(res.scores)
        corr: dict[str, stats.Estimate] = {}
        pacc = None
        if res.skipped is None and ok.sum() >= 2:
            corr = stats.correlations_ci(
                res.scores[ok],
                human[ok],
                statistics=statistics,
                groups=images[ok],
                n_boot=n_boot,
                level=level,
                seed=seed,
            )
            if jset.has_groups:
                # a row without a group is compared with no other row
                labels = [f"g:{x}" if x is not None else f"row:{i}" for i, x in enumerate(groups)]
                g = np.array(labels, dtype=object)[ok]
                pacc = stats.pairwise_accuracy_ci(
                    res.scores[ok], human[ok], g, n_boot=n_boot, level=level, seed=seed
                )
        agreements.append(
            MetricAgreement(
                label=label,
                name=res.spec.name,
                model=res.spec.model,
                checkpoint_sha256=res.checkpoint_sha256,
                n_rows=int(ok.sum()),
                n_failed=int((~ok).sum()) if res.skipped is None else 0,
                correlations=corr,
                pairwise_accuracy=pacc,
                seconds=res.seconds,
                seconds_per_1000=res.seconds_per_1000,
                n_scored=res.n_scored,
                load_seconds=res.load_seconds,
                skipped=res.skipped,
                errors=res.errors,
            )
        )
    return SetReport(
        name=jset.name,
        n_rows=len(jset.rows),
        n_images=len(set(images.tolist())),
        n_groups=len({g for g in groups if g is not None}),
        metrics=agreements,
        human=human,
        scores={k: v.scores for k, v in results.items()},
        image_keys=images.tolist(),
    )


def iter_score_rows(jset: JudgmentSet, results: dict[str, MetricScores]) -> Iterable[dict]:
    """Per-row records (id, image key, caption, human score, each metric's score)."""
    for i, r in enumerate(jset.rows):
        rec: dict = {
            "set": jset.name,
            "id": r.id,
            "image": r.image_key,
            "caption": r.caption,
            "human_score": r.human_score,
        }
        for label, res in results.items():
            v = float(res.scores[i])
            rec[label] = v if math.isfinite(v) else None
        yield rec
