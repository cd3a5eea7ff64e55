"""What a checkpoint file may make us allocate, checked before anything is decompressed or
built: zip members against the file's size, tensor views against their storage, safetensors
headers against the file, and everything against :data:`MAX_CHECKPOINT_BYTES` (64 GiB; the
environment variable ``SPECS_MAX_CHECKPOINT_BYTES`` overrides it). The bounds on what a
model's description files may state are here too;
:mod:`specs_metric.models.weights.validation` applies them.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from specs_metric.errors import CheckpointError
from specs_metric.io.reading import open_regular

# Bounds on what a checkpoint may make us allocate. Weights do not compress (a real zip
# checkpoint is stored, not deflated), so a file whose members expand far beyond its own
# size is a zip bomb, not a model.
MAX_CHECKPOINT_BYTES = 64 << 30
MAX_EXPANSION = 20  # declared uncompressed bytes per byte on disk ...
EXPANSION_SLACK = 16 << 20  # ... plus this much, for small files with compressible members
MAX_PICKLE_BYTES = 64 << 20  # the pickled structure of a state dict is tiny
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit

# Bounds on the JSON files that describe a model (config.json, preprocessor_config.json,
# shard indexes, open_clip_config.json, --arch files, safetensors metadata). Real ones are a
# few KB (a large model's shard index a few hundred) and a few levels deep.
MAX_JSON_BYTES = 8 << 20
MAX_JSON_DEPTH = 32
# Ranges of the sizes a description may state, far above any CLIP model (ViT-bigG: 48
# layers, width 1664, MLP 8192). They keep arithmetic and messages sane; what bounds memory
# is the parameter count against the file's tensors (model_files.check_model_size).
MAX_LAYERS = 512
MAX_WIDTH = 1 << 16  # hidden, MLP, projection and head widths
MAX_CONTEXT = 1 << 16
MAX_VOCAB = 1 << 22
MAX_IMAGE_SIZE = 1 << 14  # image resolution, patch, resize and crop sizes
MAX_RESIZE_RATIO = 4  # resize / crop: CLIP pipelines resize to (about) the crop size



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


def parse_json(
    text: bytes | str, where: str, error: type[ValueError] = CheckpointError
) -> Any:
    """``json.loads`` for untrusted text: a nesting deeper than :data:`MAX_JSON_DEPTH` (or than
    the parser's recursion allows) is ``error``, not a ``RecursionError``, and so is anything
    that is not JSON."""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise error(f"{where}: JSON nested too deeply (limit {MAX_JSON_DEPTH} levels)") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{where}: not valid JSON ({exc})") from exc
    # Iterative, so that checking a deep value cannot recurse either.
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children if isinstance(node, (dict, list)) else ():
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_JSON_DEPTH:
                    raise error(
                        f"{where}: JSON nested too deeply (limit {MAX_JSON_DEPTH} levels)"
                    )
                stack.append((child, depth + 1))
    return value


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
        header = parse_json(fh.read(length), f"{path}: safetensors header")
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
    :data:`~specs_metric.models.weights.limits.MAX_LAYERS`: the model is built with L layers, so
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
