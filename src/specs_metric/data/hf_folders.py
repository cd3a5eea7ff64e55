"""Reading Hugging Face ``datasets`` folders (``save_to_disk``) with pyarrow alone: the one
reader of such folders, for scoring inputs, benchmarks and training sets.

A ``DatasetDict`` folder has ``dataset_dict.json`` and one folder per split; a ``Dataset``
folder has ``state.json`` listing its Arrow files (or just ``*.arrow`` files). The files
are memory-mapped, so image bytes stay on disk until a row's image is read, and the
``datasets`` package is not needed.

These folders are untrusted input: ``state.json`` and ``dataset_dict.json`` are read bounded,
a listed file must be a regular file inside the folder (never ``/dev/zero``, a FIFO or a
path that leaves the folder), and every problem is a one-line
:class:`~specs_metric.errors.DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pyarrow as pa

from specs_metric.errors import DataError
from specs_metric.io.reading import memory_map, read_json
from specs_metric.limits import MAX_METADATA_BYTES

_SPLIT_HINT = "; choose one with --split"


def read_arrow(path: Path) -> pa.Table:
    """An Arrow IPC file in the stream format (what ``datasets`` writes) or the file format,
    memory-mapped (a regular file only)."""
    with memory_map(path) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            pass
    with memory_map(path) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: not an Arrow IPC file ({exc})") from exc


def _json_object(path: Path) -> dict:
    data = read_json(path, MAX_METADATA_BYTES, what="dataset description")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def dataset_splits(path: Path) -> list[str] | None:
    """The split names of a ``DatasetDict`` folder, or None when ``path`` is not one."""
    dict_file = path / "dataset_dict.json"
    if not dict_file.is_file():
        return None
    splits = _json_object(dict_file).get("splits", [])
    if not isinstance(splits, list) or not all(_is_name(s) for s in splits):
        raise DataError(f"{dict_file}: 'splits' must be a list of folder names")
    return list(splits)


def _is_name(value: object) -> bool:
    """A file or folder name inside a folder: relative, no ``..``, no separators beyond
    sub-folders."""
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in value


def is_dataset_folder(path: Path) -> bool:
    """Whether ``path`` is a single-split ``Dataset`` folder (``state.json`` or ``*.arrow``)."""
    return (path / "state.json").is_file() or any(path.glob("*.arrow"))


def split_files(directory: Path) -> list[Path]:
    """Arrow files of one ``Dataset`` folder, in the order ``state.json`` records them (all
    ``*.arrow`` files by name without one).

    Raises:
        DataError: an unreadable ``state.json``, or one that lists a file outside the folder.
    """
    state = directory / "state.json"
    if not state.is_file():
        return sorted(directory.glob("*.arrow"))
    files = _json_object(state).get("_data_files", [])
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise DataError(f"{state}: '_data_files' must be a list of objects")
    names = [f.get("filename") for f in files]
    bad = [n for n in names if not _is_name(n)]
    if bad:
        raise DataError(f"{state}: lists {bad[0]!r}, which is not a file name inside the folder")
    return [directory / n for n in names] if names else sorted(directory.glob("*.arrow"))


def dataset_folder_files(folder: str | Path) -> list[Path]:
    """The Arrow files of a single-split ``save_to_disk`` folder, in order.

    Raises:
        DataError: a ``DatasetDict`` (several splits), or not a datasets folder.
    """
    root = Path(folder)
    splits = dataset_splits(root)
    if splits is not None:
        raise DataError(
            f"{folder}: a DatasetDict with splits {splits}; give one split's folder, "
            f"e.g. {root / (splits[0] if splits else 'train')}"
        )
    if not (root / "state.json").is_file():
        raise DataError(
            f"{folder}: not an HF datasets folder (no state.json); give files or a pattern"
        )
    return split_files(root)
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
