"""Reading and writing checkpoint files without executing pickled code.

Supported inputs (all yield the flat reference key layout of guide §2):

- reference LongCLIP / SPECS ``.pt`` files (``torch.save(model.state_dict())``), also wrapped
  in ``{"state_dict": ...}`` / ``{"model": ...}`` or with ``module.`` prefixes (DDP);
- OpenAI CLIP TorchScript archives: only the tensors are read, by a restricted unpickler
  that never imports or runs TorchScript code;
- ``.safetensors`` files with the same keys.

Plain pickles go through ``torch.load(..., weights_only=True)``, which refuses any object
that is not a tensor or a plain container.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

# Keys some CLIP files carry that are not parameters of the model.
NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
LONG_CONTEXT = 248
CLIP_CONTEXT = 77
KEPT_ROWS = 20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a supported model (message names the file)."""


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- TorchScript archives -----------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a TorchScript class: records its attributes, runs nothing."""

    def __init__(self, *args: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.state = dict(state)


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any
) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


def _identity(*args: Any) -> Any:
    return args[0] if args else None


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl``, allowing tensors and inert module records only."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith(("build_", "restore_type_tag")):
            return _identity
        raise CheckpointError(
            f"{self._source}: TorchScript archive refers to {module}.{name}, which is not "
            "a tensor; refusing to load it"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
        raw = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
        if not raw:
            return torch.empty(0, dtype=storage_type.dtype)
        return torch.frombuffer(raw, dtype=storage_type.dtype)


def _flatten_script_object(obj: _ScriptObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten_script_object(value, f"{prefix}{name}.", out)


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    return any(n.endswith("constants.pkl") for n in archive.namelist())


def _read_torchscript(path: Path, archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    data_pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
    prefix = data_pkl[: -len("data.pkl")]
    root = _TensorOnlyUnpickler(archive.read(data_pkl), archive, prefix, path).load()
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"{path}: TorchScript archive does not hold a module")
    out: dict[str, torch.Tensor] = {}
    _flatten_script_object(root, "", out)
    # Tensor attributes that are not parameters (the causal mask) are not part of a state dict.
    return {
        k: v for k, v in out.items() if k not in NON_PARAMETER_KEYS and not k.endswith("attn_mask")
    }


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
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path)), path)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                if _is_torchscript(archive):
                    return _read_torchscript(path, archive)
        except (zipfile.BadZipFile, KeyError, StopIteration, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"{path}: damaged checkpoint archive ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled objects other than tensors "
            f"(possibly code). Only plain state dicts are loaded. Details: {str(exc)[:300]}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    return _unwrap(obj, path)


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
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=metadata)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# --- CLIP -> LongCLIP -----------------------------------------------------------------------


def stretch_positional_embedding(table: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    """Knowledge-preserved stretching of a 77-row positional table to 248 rows (guide §2).

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
