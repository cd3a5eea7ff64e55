"""Reading the tensors of an OpenAI CLIP TorchScript archive without running TorchScript.

A restricted unpickler rebuilds ``data.pkl``: TorchScript classes become inert records of
their attributes, storages are read from the archive's members after their declared sizes
are checked, and any other global is refused.
:func:`specs_metric.models.weights.checkpoint.read_state_dict`
calls it for zip files that hold ``constants.pkl``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from specs_metric.errors import CheckpointError
from specs_metric.models.weights.limits import check_extent

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


def _identity(*args: Any) -> Any:
    return args[0] if args else None


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl``, allowing tensors and inert module records only."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._source = source

    def _rebuild_tensor(
        self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any
    ) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor):
            raise CheckpointError(f"{self._source}: a tensor is built from {type(storage)}")
        offset, size, stride = check_extent(
            self._source, "a tensor", storage.numel(), offset, size, stride
        )
        return torch.as_strided(storage, size, stride, offset).clone()

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
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
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise CheckpointError(f"{self._source}: unexpected persistent id {pid!r:.200}")
        kind, storage_type, key, _location, numel = pid
        if (
            kind != "storage"
            or not isinstance(storage_type, _StorageType)
            or not isinstance(key, str)
            or not isinstance(numel, int)
        ):
            raise CheckpointError(f"{self._source}: unexpected persistent id {pid!r:.200}")
        member = f"{self._prefix}data/{key}"
        itemsize = torch.empty(0, dtype=storage_type.dtype).element_size()
        # The directory was checked, so reading a member is bounded; its size must still be
        # what the pickle declares for this dtype.
        declared = self._archive.getinfo(member).file_size
        if declared != numel * itemsize:
            raise CheckpointError(
                f"{self._source}: storage {member} holds {declared} bytes, but the archive "
                f"declares {numel} x {itemsize}-byte elements"
            )
        raw = bytearray(self._archive.read(member))
        if not raw:
            return torch.empty(0, dtype=storage_type.dtype)
        return torch.frombuffer(raw, dtype=storage_type.dtype)


def _flatten_script_object(obj: _ScriptObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten_script_object(value, f"{prefix}{name}.", out)


def is_torchscript(archive: zipfile.ZipFile) -> bool:
    """Whether a zip checkpoint is a TorchScript archive rather than a ``torch.save`` zip."""
    return any(n.endswith("constants.pkl") for n in archive.namelist())


def read_torchscript(path: Path, archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive, less its attention masks, read without importing
    or running any of its code (the caller has checked the zip directory's bounds)."""
    data_pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
    prefix = data_pkl[: -len("data.pkl")]
    try:
        root = _TensorOnlyUnpickler(archive.read(data_pkl), archive, prefix, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # any failure to parse an untrusted structure is a bad file
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{path}: malformed TorchScript archive ({type(exc).__name__}: {detail})"
        ) from exc
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"{path}: TorchScript archive does not hold a module")
    out: dict[str, torch.Tensor] = {}
    _flatten_script_object(root, "", out)
    # Tensor attributes that are not parameters (the causal mask) are not part of a state dict.
    return {k: v for k, v in out.items() if not k.endswith("attn_mask")}
