"""Every supported checkpoint layout reads to the same tensors and scores identically;
untrusted or unusable files are refused with an error naming them."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import factories
import specs_metric
from specs_metric.errors import CheckpointError
from specs_metric.models.factory import build_model
from specs_metric.models.weights.checkpoint import read_state_dict, save_state_dict

CAPTIONS = ["a cat", "A small red house next to a river under a cloudy sky.", ""]
IMAGES = ("rgb_37x53", "large_640x481")
NON_PARAMETERS = ("input_resolution", "context_length", "vocab_size")


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return factories.make_state_dict(seed=3, vision_layers=1, text_layers=1)


@pytest.fixture(scope="module")
def files(state_dict, tmp_path_factory) -> dict[str, Path]:
    """The same weights in every layout of ``factories.CHECKPOINT_FORMATS``."""
    folder = tmp_path_factory.mktemp("formats")
    return {
        fmt: factories.write_checkpoint(
            state_dict, folder / f"model-{fmt}{factories.checkpoint_suffix(fmt)}", fmt
        )
        for fmt in factories.CHECKPOINT_FORMATS
    }


@pytest.fixture(scope="module")
def reference_embeddings(files):
    """Embeddings of the plain ``.pt`` file: what every other layout must reproduce."""
    return _embeddings(files["pt"])


def _embeddings(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    scorer = specs_metric.load(path, device="cpu")
    images = [factories.image_file(name) for name in IMAGES]
    return scorer.embed_images(images), scorer.embed_texts(CAPTIONS)


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected) or sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("fmt", factories.CHECKPOINT_FORMATS)
def test_read_state_dict_gives_the_saved_tensors(fmt, files, state_dict):
    _assert_same_tensors(read_state_dict(files[fmt]), state_dict)


@pytest.mark.parametrize("fmt", [f for f in factories.CHECKPOINT_FORMATS if f != "pt"])
def test_load_gives_identical_embeddings(fmt, files, reference_embeddings):
    images, texts = _embeddings(files[fmt])
    assert torch.equal(images, reference_embeddings[0])
    assert torch.equal(texts, reference_embeddings[1])


@pytest.mark.parametrize("suffix", [".pth", ".bin", ""])
def test_reference_layout_is_read_whatever_the_suffix(suffix, state_dict, tmp_path):
    path = factories.write_checkpoint(state_dict, tmp_path / f"weights{suffix}", "pt")
    _assert_same_tensors(read_state_dict(path), state_dict)


def test_save_state_dict_round_trips_and_is_reference_layout(state_dict, tmp_path):
    for name in ("saved.pt", "saved.safetensors"):
        path = save_state_dict(state_dict, tmp_path / name)
        _assert_same_tensors(read_state_dict(path), state_dict)
    # The .pt file is a flat dict of tensors, readable by a plain weights-only torch.load.
    flat = torch.load(tmp_path / "saved.pt", weights_only=True)
    assert isinstance(flat, dict) and set(flat) == set(state_dict)


# --------------------------------------------------------------------------- OpenAI archives


@pytest.fixture(scope="module")
def openai_state_dict() -> dict[str, torch.Tensor]:
    return factories.make_openai_state_dict(seed=4)


def test_openai_archive_reads_fp16_weights_without_extras(openai_state_dict, tmp_path):
    half = factories.openai_half(openai_state_dict)
    path = factories.write_checkpoint(half, tmp_path / "ViT-tiny.pt", "torchscript")
    assert any(n.endswith("constants.pkl") for n in factories.zip_member_names(path))
    state = read_state_dict(path)
    # The archive's integer extras are not weights of the model.
    assert not set(NON_PARAMETERS) & set(state)
    _assert_same_tensors(state, half)


def test_openai_archive_loads_like_the_fp32_file(openai_state_dict, tmp_path):
    """fp16 weights in the archive equal the fp32 file's after the reference rounding."""
    archive = factories.write_checkpoint(
        factories.openai_half(openai_state_dict), tmp_path / "openai.pt", "torchscript"
    )
    plain = factories.write_checkpoint(openai_state_dict, tmp_path / "plain.pt", "pt")
    from_archive = specs_metric.load(archive, device="cpu")
    from_plain = specs_metric.load(plain, device="cpu")
    assert from_archive.context_length == from_plain.context_length == 77
    images = [factories.image_file(name) for name in IMAGES]
    assert torch.equal(from_archive.embed_images(images), from_plain.embed_images(images))
    assert torch.equal(from_archive.embed_texts(CAPTIONS), from_plain.embed_texts(CAPTIONS))


def test_plain_file_extras_are_dropped(openai_state_dict, tmp_path):
    with_extras = factories.make_openai_state_dict(seed=4, with_extras=True)
    assert set(NON_PARAMETERS) <= set(with_extras)
    path = factories.write_checkpoint(with_extras, tmp_path / "extras.pt", "pt")
    _assert_same_tensors(read_state_dict(path), openai_state_dict)
    assert build_model(read_state_dict(path)).context_length == 77


# --------------------------------------------------------------------------- refusals


def test_malicious_payloads_are_live(tmp_path):
    """Self-check: the payloads below do run code when unpickled without restrictions."""
    marker = tmp_path / "ran"
    torch.load(factories.make_malicious_pickle(tmp_path / "a.pt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    with open(factories.make_malicious_pickle(tmp_path / "b.pt", marker, legacy=True), "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    archive = factories.make_malicious_torchscript(tmp_path / "c.pt", marker)
    with zipfile.ZipFile(archive) as zf:
        pickle.loads(zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl"))))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "torchscript"])
def test_malicious_pickle_is_refused_without_running(kind, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil-{kind}.pt"
    if kind == "torchscript":
        factories.make_malicious_torchscript(path, marker)
    else:
        factories.make_malicious_pickle(path, marker, legacy=kind == "legacy")
    with pytest.raises(CheckpointError, match="refus") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="refus"):
        specs_metric.load(path, device="cpu")
    assert not marker.exists()


def test_resnet_checkpoint_is_refused(tmp_path):
    path = factories.write_checkpoint(factories.make_resnet_state_dict(), tmp_path / "RN50.pt")
    with pytest.raises(CheckpointError, match="ResNet") as info:
        specs_metric.load(path, device="cpu")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "torchscript"])
def test_truncated_file_errors_naming_it(fmt, files, tmp_path):
    path = tmp_path / f"cut{factories.checkpoint_suffix(fmt)}"
    factories.truncate_file(files[fmt], path, 0.5)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a checkpoint at all\n" * 10,
        factories.image_bytes(factories.make_test_image("tiny_5x3")),
    ],
    ids=["empty", "text", "png"],
)
def test_non_checkpoint_file_errors_naming_it(content, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_missing_file_errors_naming_it(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_pickle_without_tensors_is_refused(tmp_path):
    path = tmp_path / "config.pt"
    torch.save({"epoch": 3, "lr": 1e-5, "names": ["a", "b"]}, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "change",
    ["text_projection_shape", "res_rows", "missing_ln_final", "extra_key"],
)
def test_inconsistent_tensors_error_naming_file(change, state_dict, tmp_path):
    sd = dict(state_dict)
    if change == "text_projection_shape":
        sd["text_projection"] = torch.zeros(64, 31)
    elif change == "res_rows":
        sd["positional_embedding_res"] = torch.zeros(200, 64)
    elif change == "missing_ln_final":
        del sd["ln_final.bias"]
    else:
        sd["visual.extra.weight"] = torch.zeros(3)
    path = factories.write_checkpoint(sd, tmp_path / f"{change}.pt")
    with pytest.raises(CheckpointError) as info:
        specs_metric.load(path, device="cpu")
    assert str(path) in str(info.value)


def test_read_tensors_do_not_share_memory_with_each_other(files):
    """Tensors read from an archive are independent (editing one leaves the others)."""
    state = read_state_dict(files["torchscript"])
    before = state["visual.proj"].clone()
    state["text_projection"].zero_()
    assert torch.equal(state["visual.proj"], before)
    np.testing.assert_array_equal(state["logit_scale"].numpy(), np.float32(factories.LOGIT_SCALE))
