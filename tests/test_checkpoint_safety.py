"""Untrusted checkpoints: refused with a CheckpointError naming the file (and the tensor),
never an IndexError later, never a traceback, and never a large allocation from a small file.

Malformed archives are written by hand here (a pickler that emits the same opcodes as torch's
writers), since no torch API produces them.
"""

from __future__ import annotations

import collections
import io
import pickle
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest
import torch

import factories
import specs_metric
from specs_metric.cli import main
from specs_metric.errors import CheckpointError
from specs_metric.models.weights.checkpoint import read_state_dict
from subprocesses import child_env

# ----------------------------------------------------------------------- crafting archives


class Storage:
    """Pickled as a persistent id ``("storage", torch.<dtype>, key, "cpu", numel)``."""

    def __init__(self, key: str, numel: int, dtype: str = "FloatStorage") -> None:
        self.key, self.numel, self.dtype = key, numel, dtype


class Tensor:
    """Pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage, offset=0, size=(4,), stride=(1,)) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class Call:
    """Pickled as ``REDUCE`` of an arbitrary global ``func`` on ``args``."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


_SCRIPT = types.ModuleType("__torch__")


class Module:
    """Pickled as a TorchScript module record ``__torch__.Module`` with ``state``."""

    def __init__(self, **state) -> None:
        self.state = state

    def __reduce__(self):
        return (Module, (), self.state)


Module.__module__ = "__torch__"
_SCRIPT.Module = Module


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(torch, obj.dtype), obj.key, "cpu", obj.numel)
        return None


def _pickle(root) -> bytes:
    buf = io.BytesIO()
    sys.modules["__torch__"] = _SCRIPT  # lets pickle name the fake TorchScript class
    try:
        _Pickler(buf, protocol=2).dump(root)
    finally:
        del sys.modules["__torch__"]
    return buf.getvalue()


def _write_header(z: zipfile.ZipFile, root, script: bool) -> None:
    """The members of an archive besides its tensor data."""
    z.writestr("archive/data.pkl", _pickle(root))
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")
    if script:
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))


def write_archive(path: Path, root, records: dict, *, script: bool = True) -> Path:
    """A zip checkpoint: TorchScript layout (``constants.pkl`` present) or torch.save's."""
    with zipfile.ZipFile(path, "w") as z:
        _write_header(z, root, script)
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
    return path


def write_bomb(path: Path, nbytes: int, *, script: bool) -> Path:
    """A small archive whose one float tensor inflates to ``nbytes`` (deflated zeros)."""
    numel = nbytes // 4
    root = {"w": Tensor(Storage("0", numel), size=(numel,))}
    if script:
        root = Module(**root)
    with zipfile.ZipFile(path, "w") as z:
        _write_header(z, root, script)
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        block = bytes(1 << 24)
        with z.open(info, "w", force_zip64=True) as member:
            for _ in range(nbytes // len(block)):
                member.write(block)
    return path


FLOATS = torch.arange(4.0).numpy().tobytes()  # one 4-element float storage


# ---------------------------------------------------------------------- the crafting works


def test_handmade_archives_read_like_torch_ones(tmp_path):
    root = {"w": Tensor(Storage("0", 4), size=(2, 2), stride=(2, 1))}
    for script in (True, False):
        path = write_archive(tmp_path / f"ok-{script}.pt", Module(**root) if script else root,
                             {"0": FLOATS}, script=script)
        assert torch.equal(read_state_dict(path)["w"], torch.arange(4.0).reshape(2, 2))


# ------------------------------------------------------------------- malformed TorchScript


MALFORMED = {
    "stride out of bounds": (Module(w=Tensor(Storage("0", 4), size=(2, 2), stride=(4, 1))),
                             "reaches element 5 of a 4-element storage"),
    "offset out of bounds": (Module(w=Tensor(Storage("0", 4), offset=3, size=(2,))),
                             "reaches element 4 of a 4-element storage"),
    "negative stride": (Module(w=Tensor(Storage("0", 4), size=(2,), stride=(-1,))),
                        "invalid layout"),
    "size is not a tuple": (Module(w=Tensor(Storage("0", 4), size="ab")), "invalid layout"),
    "stride-0 expansion": (Module(w=Tensor(Storage("0", 4), size=(1 << 20,), stride=(0,))),
                           "elements but its storage only 4"),
    "non-callable REDUCE": (Module(w=Call(torch.FloatStorage)), "malformed TorchScript"),
    "storage numel disagrees with its bytes": (Module(w=Tensor(Storage("0", 1000), size=(4,))),
                                               "holds 16 bytes"),
    "storage dtype disagrees with its bytes": (
        Module(w=Tensor(Storage("0", 3, "DoubleStorage"), size=(2,))), "holds 16 bytes"),
    "root is not a module": ({"w": Tensor(Storage("0", 4))}, "does not hold a module"),
    "disallowed global": (Module(w=Call(print, "hi")), "refers to __builtin__.print"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_torchscript_is_a_checkpoint_error(case, tmp_path):
    root, message = MALFORMED[case]
    path = write_archive(tmp_path / "bad.pt", root, {"0": FLOATS})
    with pytest.raises(CheckpointError, match=message) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_malformed_torchscript_is_one_line_in_the_cli(tmp_path, capsys):
    path = write_archive(tmp_path / "bad.pt", MALFORMED["non-callable REDUCE"][0], {"0": FLOATS})
    code = main(["score", "--model", str(path), "--input", "x.jsonl", "--output",
                 str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err


# ----------------------------------------------------------------------- loaded tensors


def test_torch_load_stride_zero_expansion_is_refused(tmp_path):
    """torch.load builds such a view without copying; building the model would expand it."""
    root = {"w": Tensor(Storage("0", 1), size=(1 << 24,), stride=(0,))}
    path = write_archive(tmp_path / "expand.pt", root, {"0": FLOATS[:4]}, script=False)
    with pytest.raises(CheckpointError, match="tensor w has 16777216 elements"):
        read_state_dict(path)


# --------------------------------------------------------------------- model consistency


def _load_error(state: dict, tmp_path: Path) -> str:
    path = factories.write_checkpoint(state, tmp_path / "model.pt", "pt")
    with pytest.raises(CheckpointError) as info:
        specs_metric.load(path, device="cpu")
    assert str(path) in str(info.value)
    return str(info.value)


def test_wrong_vocabulary_size_is_refused_at_load_time(tmp_path):
    message = _load_error(factories.make_state_dict(vocab_size=1000), tmp_path)
    assert "token_embedding.weight has 1000 rows" in message and "49408" in message


def test_wrong_vocabulary_is_one_line_in_score(tmp_path, capsys):
    path = factories.write_checkpoint(factories.make_state_dict(vocab_size=1000),
                                      tmp_path / "small-vocab.pt", "pt")
    rows = tmp_path / "in.jsonl"
    image = factories.image_file("rgb_37x53")
    rows.write_text(f'{{"image": "{image}", "caption": "a zebra"}}\n')
    code = main(["score", "--model", str(path), "--input", str(rows), "--output",
                 str(tmp_path / "o.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "small-vocab.pt" in err and "token_embedding.weight" in err


def test_width_that_does_not_split_into_heads_is_refused(tmp_path):
    # 200 // 64 = 3 heads, and 200 is not a multiple of 3.
    message = _load_error(factories.make_state_dict(text_width=200), tmp_path)
    assert "text width 200 is not a multiple of the head width 64" in message


def test_integer_weights_are_refused(tmp_path):
    state = factories.make_state_dict()
    state["ln_final.bias"] = torch.zeros(64, dtype=torch.int64)
    assert "ln_final.bias holds torch.int64" in _load_error(state, tmp_path)


def test_non_square_patch_is_refused(tmp_path):
    state = factories.make_state_dict()
    state["visual.conv1.weight"] = state["visual.conv1.weight"][..., :8]
    assert "visual.conv1.weight has shape (64, 3, 16, 8)" in _load_error(state, tmp_path)


def test_one_row_positional_table_is_refused(tmp_path):
    state = factories.make_openai_state_dict()
    state["positional_embedding"] = state["positional_embedding"][:1]
    assert "positional_embedding has 1 rows" in _load_error(state, tmp_path)


# ------------------------------------------------------------------- refused pickles


def test_refused_pickle_message_is_ours(tmp_path):
    marker = tmp_path / "marker"
    path = factories.make_malicious_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert not marker.exists()
    assert str(path) in message and "never executed" in message and "safetensors" in message
    assert "weights_only" not in message  # torch's advice to turn the safety off is dropped
    assert "io.open" in message  # what was refused


def test_refused_trainer_state_on_resume_is_one_line(tmp_path, capsys):
    from PIL import Image

    from specs_metric.models.weights.checkpoint import save_state_dict
    from specs_metric.training.prepare import prepare_dataset

    lines = []
    for color in ("red", "green", "blue", "white"):
        Image.new("RGB", (40, 36), color).save(tmp_path / f"{color}.png")
        caption = f"A {color} square fills the frame. The {color} paint looks fresh and glossy."
        lines.append(f'{{"image": "{color}.png", "caption": "{caption}"}}\n')
    (tmp_path / "in.jsonl").write_text("".join(lines))
    prepare_dataset(tmp_path / "in.jsonl", tmp_path / "train.parquet", progress=False,
                    log_fn=lambda s: None)
    save_state_dict(factories.make_state_dict(), tmp_path / "init.pt")
    step = tmp_path / "out" / "checkpoints" / "step-1"
    step.mkdir(parents=True)
    save_state_dict(factories.make_state_dict(), step / "model.pt")
    marker = tmp_path / "marker"
    factories.make_malicious_pickle(step / "trainer_state.pt", marker)
    code = main(["train", "--init", str(tmp_path / "init.pt"), "--data",
                 str(tmp_path / "train.parquet"), "--output", str(tmp_path / "out"),
                 "--resume", str(step), "--workers", "0", "--quiet", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "trainer_state.pt" in err and "trainer state" in err and "weights_only" not in err


# ------------------------------------------------------------- bombs: bounded memory

_MEASURE = textwrap.dedent(
    """
    import resource, sys
    from specs_metric.models.weights.checkpoint import CheckpointError, read_state_dict
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_state_dict(sys.argv[1])
        outcome = "loaded"
    except CheckpointError as exc:
        outcome = "refused: " + str(exc)
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"{growth_mb:.0f}")
    print(outcome)
    """
)


def _read_in_child(path: Path) -> tuple[float, str]:
    """Read ``path`` in a fresh process; returns its peak-RSS growth (MB) and the outcome."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    growth, outcome = done.stdout.splitlines()[-2:]
    return float(growth), outcome


BOMB_BYTES = 256 << 20


@pytest.mark.parametrize("script", [True, False], ids=["torchscript", "torch-zip"])
def test_zip_bomb_is_refused_before_it_is_inflated(script, tmp_path):
    path = write_bomb(tmp_path / "bomb.pt", BOMB_BYTES, script=script)
    assert path.stat().st_size < 2 << 20  # a small file ...
    growth, outcome = _read_in_child(path)
    assert outcome.startswith("refused") and "zip bomb" in outcome  # ... refused
    assert growth < 100, f"reading a refused {path.stat().st_size}-byte file grew RSS {growth} MB"


def test_legacy_pickle_declaring_a_huge_storage_is_refused_in_bounded_memory(tmp_path):
    """torch's pre-zip format: the storage size comes from the file, before the data."""
    import struct

    numel = BOMB_BYTES // 4

    class LegacyPickler(_Pickler):
        def persistent_id(self, obj):
            pid = super().persistent_id(obj)
            return None if pid is None else (*pid, None)  # + view metadata

    path = tmp_path / "legacy.pt"
    with open(path, "wb") as fh:
        pickle.dump(0x1950A86A20F9469CFC6C, fh, protocol=2)  # the legacy magic number
        pickle.dump(1001, fh, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, fh, protocol=2)
        LegacyPickler(fh, protocol=2).dump({"w": Tensor(Storage("0", numel), size=(numel,))})
        pickle.dump(["0"], fh, protocol=2)
        fh.write(struct.pack("<q", numel) + bytes(64))
    growth, outcome = _read_in_child(path)
    assert outcome.startswith("refused") and "legacy.pt" in outcome
    assert growth < 100


def test_safetensors_header_declaring_more_than_the_file_is_refused(tmp_path):
    import json

    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 28],
                               "data_offsets": [0, 1 << 30]}}).encode()
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    growth, outcome = _read_in_child(path)
    assert outcome.startswith("refused") and "data section" in outcome
    assert growth < 100


def test_safetensors_header_longer_than_the_file_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header declares"):
        read_state_dict(path)
