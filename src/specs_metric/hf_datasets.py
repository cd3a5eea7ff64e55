"""Reading Hugging Face ``datasets`` folders (``save_to_disk``) with pyarrow alone.

A ``DatasetDict`` folder has ``dataset_dict.json`` and one folder per split; a ``Dataset``
folder has ``state.json`` listing its Arrow files (or just ``*.arrow`` files). The files
are memory-mapped, so image bytes stay on disk until a row's image is read, and the
``datasets`` package is not needed. Used by the training-set reader
(:func:`specs_metric.training.examples.read_table`) and the sDCI reader
(:mod:`specs_metric.bench.sdci`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from specs_metric.errors import DataError

_SPLIT_HINT = "; choose one with --split"


def read_arrow(path: Path) -> pa.Table:
    """An Arrow IPC file in the stream format (what ``datasets`` writes) or the file format."""
    with pa.memory_map(str(path), "r") as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            pass
    with pa.memory_map(str(path), "r") as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: not an Arrow IPC file ({exc})") from exc


def dataset_splits(path: Path) -> list[str] | None:
    """The split names of a ``DatasetDict`` folder, or None when ``path`` is not one."""
    dict_file = path / "dataset_dict.json"
    if not dict_file.is_file():
        return None
    return list(json.loads(dict_file.read_text()).get("splits", []))


def is_dataset_folder(path: Path) -> bool:
    """Whether ``path`` is a single-split ``Dataset`` folder (``state.json`` or ``*.arrow``)."""
    return (path / "state.json").is_file() or any(path.glob("*.arrow"))


def split_files(directory: Path) -> list[Path]:
    """Arrow files of one ``Dataset`` folder, in the order ``state.json`` records them."""
    state = directory / "state.json"
    if state.is_file():
        files = json.loads(state.read_text()).get("_data_files", [])
        names = [f["filename"] for f in files if "filename" in f]
        if names:
            return [directory / n for n in names]
    return sorted(directory.glob("*.arrow"))


def choose_split(
    available: list[str], split: str | None, default: str, where: Path, hint: str = ""
) -> str:
    """``split`` if given (and present); else ``default`` when present, else the only one.
    ``hint`` ends the message of an ambiguous choice (e.g. how to choose)."""
    if split is None:
        if default in available:
            return default
        if len(available) == 1:
            return available[0]
        raise DataError(
f"{where}: dataset has splits {available} and none is {default!r}{hint}")
    if split not in available:
        raise DataError(f"{where}: no split {split!r}; available: {available}")
    return split


def read_files(files: list[Path]) -> pa.Table:
    """The Arrow files of a split as one table (memory-mapped)."""
    return pa.concat_tables([read_arrow(f) for f in files])


def source_files(
    path: Path, split: str | None, suffixes: tuple[str, ...], default: str = "test"
) -> tuple[list[Path], str]:
    """The files holding a data set's rows, and how messages describe them.

    ``path`` is a file (itself), a ``datasets`` folder (the Arrow files of ``split``), or a
    folder of ``{split}<suffix>`` files (the first suffix of ``suffixes`` present wins).
    Without ``split``, ``default`` is taken when present, else the only split.
    """
    if path.is_file():
        return [path], str(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    splits = dataset_splits(path)
    if splits is not None:
        chosen = choose_split(splits, split, default, path, _SPLIT_HINT)
        return split_files(path / chosen), f"{path} [{chosen}]"
    if is_dataset_folder(path):
        return split_files(path), str(path)
    by_split = {p.stem: p for s in reversed(suffixes) for p in path.glob(f"*{s}")}
    if not by_split:
        names = " / ".join(f"{{split}}{s}" for s in suffixes)
        raise DataError(
            f"{path}: no datasets folder (dataset_dict.json, state.json, *.arrow) and no "
            f"{names} file"
        )
    chosen = choose_split(sorted(by_split), split, default, path, _SPLIT_HINT)
    return [by_split[chosen]], str(by_split[chosen])
