"""The checks of what a checkpoint file may make us allocate, before anything is
decompressed or built: zip members against the file's size, tensor views against their
storage, safetensors headers against the file, layer keys, and everything against
:data:`~specs_metric.limits.MAX_CHECKPOINT_BYTES` (64 GiB; the environment variable
``SPECS_MAX_CHECKPOINT_BYTES`` overrides it). The limits themselves, like every limit of the
package, are in :mod:`specs_metric.limits`; :mod:`specs_metric.models.weights.validation`
applies the ones on description files.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from specs_metric.errors import CheckpointError
from specs_metric.io.reading import open_regular, parse_json
from specs_metric.limits import (
    EXPANSION_SLACK,
    MAX_CHECKPOINT_BYTES,
    MAX_EXPANSION,
    MAX_JSON_DEPTH,
    MAX_LAYERS,
    MAX_PICKLE_BYTES,
    MAX_SAFETENSORS_HEADER,
)


def max_checkpoint_bytes() -> int:
    """The absolute cap on the bytes one checkpoint may hold (``SPECS_MAX_CHECKPOINT_BYTES``)."""
    value = os.environ.get("SPECS_MAX_CHECKPOINT_BYTES")
    return int(value) if value else MAX_CHECKPOINT_BYTES


def byte_budget(path: Path) -> int:
    """How many bytes ``path`` may declare in all: bounded by its size and the absolute cap."""
    return min(max_checkpoint_bytes(), MAX_EXPANSION * path.stat().st_size + EXPANSION_SLACK)


def check_zip_directory(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse an archive whose members declare more bytes than the file can honestly hold.

    Reads only the central directory; nothing is decompressed.
    """
    budget = byte_budget(path)
    total = 0
    for info in archive.infolist():
        total += info.file_size
        if info.file_size > budget or total > budget:
            raise CheckpointError(
                f"{path}: archive member {info.filename} declares {info.file_size} bytes "
                f"({total} in all) from a {path.stat().st_size}-byte file; refusing to "
                f"expand it (limit {budget} bytes; a zip bomb?)"
            )
        if info.filename.endswith(".pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"{path}: {info.filename} declares {info.file_size} bytes of pickled "
                f"structure (limit {MAX_PICKLE_BYTES}); refusing to read it"
            )


def _storage_elements(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)


def check_extent(
    source: Path, what: str, storage_numel: int, offset: Any, size: Any, stride: Any
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Validate a tensor view before building it: integers, in bounds, no larger than its
    storage (a stride-0 view of one element could otherwise expand to any size)."""
    ok = (
        isinstance(offset, int)
        and isinstance(size, (tuple, list))
        and isinstance(stride, (tuple, list))
        and len(size) == len(stride)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in stride)
        and not isinstance(offset, bool)
        and offset >= 0
    )
    if not ok:
        raise CheckpointError(
            f"{source}: {what} has an invalid layout (offset {offset!r}, size {size!r}, "
            f"stride {stride!r})"
        )
    numel = math.prod(size)
    if numel:
        last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
        if last >= storage_numel:
            raise CheckpointError(
                f"{source}: {what} (size {tuple(size)}, stride {tuple(stride)}, offset "
                f"{offset}) reaches element {last} of a {storage_numel}-element storage"
            )
        if numel > storage_numel:
            raise CheckpointError(
                f"{source}: {what} has {numel} elements but its storage only {storage_numel} "
                "(overlapping strides); refusing to expand it"
            )
    return offset, tuple(size), tuple(stride)


def check_loaded_tensors(path: Path, obj: Any) -> None:
    """Bound the tensors ``torch.load`` built: each within its storage, all within budget."""
    budget = byte_budget(path)
    total = 0
    stack = [("", obj)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            check_extent(
                path,
                f"tensor {name or '<root>'}",
                _storage_elements(value),
                value.storage_offset(),
                tuple(value.shape),
                tuple(value.stride()),
            )
            total += value.numel() * value.element_size()
            if total > budget:
                raise CheckpointError(
                    f"{path}: tensors hold more than {budget} bytes (at {name}); refusing them"
                )
        elif isinstance(value, dict):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(value))


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Read the header of a safetensors file and check every declared extent against the file,
    before the library maps or copies anything; returns the header."""
    size = path.stat().st_size
    with open_regular(path, what="checkpoint file", error=CheckpointError) as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckpointError(
                f"{path}: safetensors header declares {length} bytes in a {size}-byte file"
            )
        header = parse_json(
            fh.read(length), f"{path}: safetensors header", CheckpointError, MAX_JSON_DEPTH
        )
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    metadata = header.get("__metadata__", {})
    # The format's metadata maps strings to strings (ours keep JSON configs in some of them).
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: safetensors __metadata__ must be an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointError(
                f"{path}: safetensors __metadata__.{key} must be a string, not "
                f"{type(value).__name__}"
            )
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(v, int) and v >= 0 for v in offsets)
            or not isinstance(shape, list)
            or not all(isinstance(v, int) and v >= 0 for v in shape)
        ):
            raise CheckpointError(f"{path}: safetensors entry {name!r} is malformed")
        if offsets[0] > offsets[1] or offsets[1] > data_bytes:
            raise CheckpointError(
                f"{path}: tensor {name} declares bytes {offsets[0]}..{offsets[1]} of a "
                f"{data_bytes}-byte data section"
            )
    return header


_INDEX = re.compile(r"[0-9]+")


def layer_count(keys: Iterable[str], prefix: str) -> int:
    """The number of layers under ``prefix`` (keys ``<prefix>.<i>.<name>``).

    The indices must run 0..L-1 with L at most
    :data:`~specs_metric.limits.MAX_LAYERS`: the model is built with L layers, so
    a stray index (``resblocks.1000000000``) or thousands of extra ones must not pass as a
    layer count. Keys with anything else after the prefix are left to the shape check.

    Raises:
        ValueError: indices with gaps or beyond the limit (the caller names the file).
    """
    start = prefix + "."
    found: set[int] = set()
    for key in keys:
        if not key.startswith(start):
            continue
        head = key[len(start) :].partition(".")[0]
        if not _INDEX.fullmatch(head):
            continue
        if len(head) > 6 or int(head) >= MAX_LAYERS:
            raise ValueError(
                f"{key}: layer index {head[:12]}{'...' if len(head) > 12 else ''} is beyond "
                f"the limit of {MAX_LAYERS} layers"
            )
        found.add(int(head))
    if found and found != set(range(len(found))):
        gaps = sorted(set(range(max(found) + 1)) - found)
        raise ValueError(
            f"{prefix}: layer indices must run 0..{len(found) - 1} without gaps, but layer "
            f"{gaps[0]} is missing and layer {max(found)} present"
        )
    return len(found)
