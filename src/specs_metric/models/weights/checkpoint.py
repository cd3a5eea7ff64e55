"""Reading and writing checkpoint files without executing pickled code.

Supported inputs, all read into the flat key layout of the reference LongCLIP state dict
(``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``,
``positional_embedding``, ``logit_scale``, ...):

- reference LongCLIP / SPECS ``.pt`` files (``torch.save(model.state_dict())``), also wrapped
  in ``{"state_dict": ...}`` / ``{"model": ...}`` or with ``module.`` prefixes (DDP);
- OpenAI CLIP TorchScript archives: only the tensors are read, by a restricted unpickler
  that never imports or runs TorchScript code (:mod:`specs_metric.models.weights.torchscript`);
- ``.safetensors`` files with the same keys.

Plain pickles go through ``torch.load(..., weights_only=True)``, which refuses any object
that is not a tensor or a plain container.

A small file must not make us allocate much: before anything is decompressed or allocated,
the sizes a file declares (zip members, compression ratio, tensor extents against their
storage, safetensors headers) are checked against its size on disk and against
``MAX_CHECKPOINT_BYTES`` (64 GiB; the environment variable ``SPECS_MAX_CHECKPOINT_BYTES``
overrides it); those checks are :mod:`specs_metric.models.weights.limits`.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from specs_metric.errors import CheckpointError
from specs_metric.io.reading import check_file
from specs_metric.io.writing import atomic_write
from specs_metric.models.weights.limits import (
    check_loaded_tensors,
    check_safetensors_header,
    check_zip_directory,
)
from specs_metric.models.weights.torchscript import is_torchscript, read_torchscript

# Keys some CLIP files carry that are not parameters of the model.
NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
LONG_CONTEXT = 248
CLIP_CONTEXT = 77
KEPT_ROWS = 20


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
    check_file(path, what=f"{what} file", error=CheckpointError)  # no FIFO or device
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                check_zip_directory(path, archive)
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{path}: damaged {what} archive ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(refused_pickle_message(path, exc, what)) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: not a readable PyTorch {what} ({detail})") from exc
    check_loaded_tensors(path, obj)
    return obj


def write_torch(
    obj: Any, path: str | os.PathLike[str], shown: str | os.PathLike[str] | None = None
) -> None:
    """``torch.save`` whose write failures (disk full, quota) surface as ``OSError``.

    torch reports them as a ``RuntimeError`` from its zip writer with no file name; the
    message names ``shown`` (the final name of a file written under a temporary one).
    """
    try:
        if isinstance(path, (str, os.PathLike)):
            with atomic_write(path, "wb") as out:
                torch.save(obj, out)
        else:  # a file object the caller opened
            torch.save(obj, path)
    except RuntimeError as exc:
        raise OSError(f"could not write {shown or path} (disk full?): {exc}") from exc


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
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    check_file(path, what="checkpoint file", error=CheckpointError)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        check_safetensors_header(path)
        try:
            return _unwrap(load_file(str(path)), path)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                check_zip_directory(path, archive)
                if is_torchscript(archive):
                    tensors = read_torchscript(path, archive)
                    return {k: v for k, v in tensors.items() if k not in NON_PARAMETER_KEYS}
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
    with atomic_write(path, "wb") as out:  # never through a link; whole or not at all
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import save_file

            try:  # into the temporary this process just created (its name is random)
                save_file(tensors, out.name, metadata=metadata)
            except SafetensorError as exc:
                raise OSError(f"could not write {path}: {exc}") from exc
        else:
            write_torch(tensors, out, shown=path)
    return path


# --- CLIP -> LongCLIP -----------------------------------------------------------------------


def stretch_positional_embedding(table: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    """Knowledge-preserved stretching of a 77-row positional table to 248 rows (LongCLIP;
    docs/models.md, "Exactness and reference quirks").

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
