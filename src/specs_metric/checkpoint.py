"""Reading and writing checkpoint files without executing pickled code.

Supported inputs, all read into the flat key layout of the reference LongCLIP state dict
(``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``,
``positional_embedding``, ``logit_scale``, ...):

- reference LongCLIP / SPECS ``.pt`` files (``torch.save(model.state_dict())``), also wrapped
  in ``{"state_dict": ...}`` / ``{"model": ...}`` or with ``module.`` prefixes (DDP);
- OpenAI CLIP TorchScript archives: only the tensors are read, by a restricted unpickler
  that never imports or runs TorchScript code (:mod:`specs_metric.torchscript`);
- ``.safetensors`` files with the same keys.

Plain pickles go through ``torch.load(..., weights_only=True)``, which refuses any object
that is not a tensor or a plain container.

A small file must not make us allocate much: before anything is decompressed or allocated,
the sizes a file declares (zip members, compression ratio, tensor extents against their
storage, safetensors headers) are checked against its size on disk and against
``MAX_CHECKPOINT_BYTES`` (64 GiB; the environment variable ``SPECS_MAX_CHECKPOINT_BYTES``
overrides it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

# Keys some CLIP files carry that are not parameters of the model.
NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
LONG_CONTEXT = 248
CLIP_CONTEXT = 77
KEPT_ROWS = 20


# Bounds on what a checkpoint may make us allocate. Weights do not compress (a real zip
# checkpoint is stored, not deflated), so a file whose members expand far beyond its own
# size is a zip bomb, not a model.
MAX_CHECKPOINT_BYTES = 64 << 30
MAX_EXPANSION = 20  # declared uncompressed bytes per byte on disk ...
EXPANSION_SLACK = 16 << 20  # ... plus this much, for small files with compressible members
MAX_PICKLE_BYTES = 64 << 20  # the pickled structure of a state dict is tiny
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a supported model (message names the file)."""


def max_checkpoint_bytes() -> int:
    """The absolute cap on the bytes one checkpoint may hold (``SPECS_MAX_CHECKPOINT_BYTES``)."""
    value = os.environ.get("SPECS_MAX_CHECKPOINT_BYTES")
    return int(value) if value else MAX_CHECKPOINT_BYTES


def _byte_budget(path: Path) -> int:
    """How many bytes ``path`` may declare in all: bounded by its size and the absolute cap."""
    return min(max_checkpoint_bytes(), MAX_EXPANSION * path.stat().st_size + EXPANSION_SLACK)


def _check_zip_directory(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse an archive whose members declare more bytes than the file can honestly hold.

    Reads only the central directory; nothing is decompressed.
    """
    budget = _byte_budget(path)
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


def _check_loaded_tensors(path: Path, obj: Any) -> None:
    """Bound the tensors ``torch.load`` built: each within its storage, all within budget."""
    budget = _byte_budget(path)
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


def _check_safetensors_header(path: Path) -> None:
    """Read the header of a safetensors file and check every declared extent against the file,
    before the library maps or copies anything."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckpointError(
                f"{path}: safetensors header declares {length} bytes in a {size}-byte file"
            )
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_bytes = size - 8 - length
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


_TORCH_HINT = re.compile(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand (\d+)")


def refused_pickle_message(path: Path, exc: BaseException, what: str = "checkpoint") -> str:
    """Our message for a pickle that ``torch.load(weights_only=True)`` refused.

    torch's own text advises rerunning with ``weights_only=False``, which would run the
    file's code; we never do that, so its advice is replaced by what to do instead.
    """
    match = _TORCH_HINT.search(str(exc))
    found = ""
    if match and match.group(1):
        found = f" (it refers to {match.group(1)})"
    elif match:
        found = f" (unsupported pickle opcode {match.group(2)})"
    return (
        f"{path}: refused to load this {what}: it holds pickled objects other than "
        f"tensors and plain containers{found}, which could run code when unpickled, and "
        "pickled code is never executed here. If you trust the file, convert it to a plain "
        "state dict or a .safetensors file with the tool that wrote it"
    )


def load_weights_only(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with its sizes checked first.

    For zip pickles the directory is checked before torch reads a record; afterwards every
    tensor must lie within its storage and all of them within the file's byte budget.

    Raises:
        CheckpointError: a refused pickle (our message, naming the file), a damaged or
            oversized file.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                _check_zip_directory(path, archive)
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{path}: damaged {what} archive ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(refused_pickle_message(path, exc, what)) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: not a readable PyTorch {what} ({detail})") from exc
    _check_loaded_tensors(path, obj)
    return obj


def write_torch(
    obj: Any, path: str | os.PathLike[str], shown: str | os.PathLike[str] | None = None
) -> None:
    """``torch.save`` whose write failures (disk full, quota) surface as ``OSError``.

    torch reports them as a ``RuntimeError`` from its zip writer with no file name; the
    message names ``shown`` (the final name of a file written under a temporary one).
    """
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        raise OSError(f"could not write {shown or path} (disk full?): {exc}") from exc


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- plain files ---------------------------------------------------------------------------


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the flat tensor dict inside a loaded object and normalise its keys."""
    while isinstance(obj, dict):
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        elif "model" in obj and isinstance(obj["model"], dict):
            obj = obj["model"]
        else:
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not contain a state dict of tensors")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor) or key in NON_PARAMETER_KEYS:
            continue
        for wrapper in ("module.", "_orig_mod."):
            if key.startswith(wrapper):
                key = key[len(wrapper) :]
        state[key] = value
    return state


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the flat state dict from any supported checkpoint file, never running code.

    Args:
        path: a ``.pt``/``.pth``/``.bin`` pickle (zip or legacy), a TorchScript archive or a
            ``.safetensors`` file.

    Returns:
        Tensors keyed like the reference state dict, without extras such as
        ``input_resolution``.

    Raises:
        CheckpointError: missing, empty or unreadable file, a pickle holding anything but
            tensors and containers (refused, not executed), or no tensors inside.
    """
    from specs_metric.torchscript import is_torchscript, read_torchscript

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _check_safetensors_header(path)
        try:
            return _unwrap(load_file(str(path)), path)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                _check_zip_directory(path, archive)
                if is_torchscript(archive):
                    return read_torchscript(path, archive)
        except (zipfile.BadZipFile, KeyError, StopIteration, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"{path}: damaged checkpoint archive ({exc})") from exc
    return _unwrap(load_weights_only(path), path)


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a flat state dict: safetensors for ``*.safetensors``, else ``torch.save``.

    ``metadata`` (string pairs, e.g. the model config) goes into a safetensors header; a
    ``.pt`` file has no place for it and ignores it.

    The ``.pt`` layout is the reference one (a flat dict), so the reference code loads it.
    The write is atomic (temporary file + rename), so an interrupted save never leaves a
    truncated checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import save_file

            try:
                save_file(tensors, tmp, metadata=metadata)
            except SafetensorError as exc:
                raise OSError(f"could not write {path}: {exc}") from exc
        else:
            write_torch(tensors, tmp, shown=path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# --- CLIP -> LongCLIP -----------------------------------------------------------------------


def stretch_positional_embedding(table: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    """Knowledge-preserved stretching of a 77-row positional table to 248 rows (LongCLIP;
    README, "Exactness and reference quirks").

    Rows 0..19 are kept; each later gap between rows ``20+i`` and ``21+i`` is filled with
    four rows interpolated at 0, 1/4, 1/2, 3/4; the last four rows extrapolate from the
    final difference.

    Args:
        table: the (77, W) CLIP positional embedding.
        exact: compute in float64. By default the arithmetic is the reference's: its
            loader stretches while the model is still fp16, so every row is rounded to fp16
            and the interpolation runs in fp16 (``3*a/4 + 1*b/4``, ...). The two differ by
            about 2e-5 per entry.

    Returns:
        A (248, W) table in the input's dtype.
    """
    if table.shape[0] != CLIP_CONTEXT:
        raise ValueError(f"expected a {CLIP_CONTEXT}-row positional table, got {table.shape[0]}")
    p = table.double() if exact else table.half()
    kept = p[:KEPT_ROWS]
    a, b = p[KEPT_ROWS:-1], p[KEPT_ROWS + 1 :]  # the 56 gaps
    # Same operation order as the reference, so fp16 rounding matches it bit for bit.
    steps = [a, 3 * a / 4 + 1 * b / 4, 2 * a / 4 + 2 * b / 4, 1 * a / 4 + 3 * b / 4]
    middle = torch.stack(steps, dim=1).reshape(-1, p.shape[1])
    last, before = p[-1], p[-2]
    tail = torch.stack([last + k * (last - before) / 4 for k in range(4)])
    out = torch.cat([kept, middle, tail])
    assert out.shape[0] == LONG_CONTEXT
    return out.to(table.dtype)


def clip_to_longclip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a 77-position CLIP state dict to LongCLIP (248 positions) by stretching.

    The stretched table initialises both ``positional_embedding`` and
    ``positional_embedding_res``, as LongCLIP does.
    """
    if "positional_embedding_res" in state_dict:
        raise ValueError("state dict is already a LongCLIP one (has positional_embedding_res)")
    out = dict(state_dict)
    stretched = stretch_positional_embedding(state_dict["positional_embedding"])
    out["positional_embedding"] = stretched
    out["positional_embedding_res"] = stretched.clone()
    return out
