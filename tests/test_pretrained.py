"""Named models: registry, cached downloads with checksums, and the offline error."""

from __future__ import annotations

import hashlib

import pytest
import torch

from factories import make_state_dict
from specs_metric.cli import main
from specs_metric.errors import ModelNotAvailableError
from specs_metric.models.weights import pretrained
from specs_metric.models.weights.pretrained import REGISTRY, PretrainedModel, resolve

REQUIRED = [
    "specs-b32",
    "longclip-b32",
    "longclip-b16",
    "longclip-l14",
    "clip-b32",
    "clip-b16",
    "clip-l14",
]


def test_registry_lists_the_released_models(capsys):
    for name in REQUIRED:
        assert name in REGISTRY
    assert REGISTRY["specs-b32"].hf_repo == "Xiaohud/SPECS"
    assert REGISTRY["specs-b32"].filename == "spec.pt"
    for name in ("clip-b32", "clip-b16", "clip-l14"):
        entry = REGISTRY[name]
        assert entry.sha256 and entry.sha256 in entry.url  # OpenAI URLs embed their sha256
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in REQUIRED)


def test_offline_hub_model_fails_with_one_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotAvailableError) as err:
        resolve("specs-b32")
    msg = str(err.value)
    assert "spec.pt" in msg and "Xiaohud/SPECS" in msg and "--model /path/to/spec.pt" in msg


def test_hub_model_is_used_from_the_cache_offline(monkeypatch, tmp_path):
    """A file already in the Hugging Face cache resolves with no network."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--Xiaohud--SPECS" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--Xiaohud--SPECS" / "refs").mkdir()
    (cache / "models--Xiaohud--SPECS" / "refs" / "main").write_text("a" * 40)
    torch.save(make_state_dict(seed=0), snapshot / "spec.pt")
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(fd, "HF_HUB_CACHE", str(cache), raising=False)
    path = resolve("specs-b32")
    assert path.name == "spec.pt" and path.is_file()


def _url_entry(source, sha):
    return PretrainedModel("tmp-model", "test", url=source.as_uri(), sha256=sha)


def test_url_download_verifies_sha256_and_caches(monkeypatch, tmp_path):
    source = tmp_path / "ViT-T.pt"
    torch.save(make_state_dict(seed=1), source)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setenv("SPECS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(REGISTRY, "tmp-model", _url_entry(source, sha))
    path = resolve("tmp-model")
    assert path.read_bytes() == source.read_bytes() and path != source
    source.unlink()  # now only the cache has it
    monkeypatch.setenv("SPECS_OFFLINE", "1")
    assert resolve("tmp-model") == path


def test_url_download_with_wrong_checksum_is_rejected(monkeypatch, tmp_path):
    source = tmp_path / "x.pt"
    source.write_bytes(b"some bytes")
    monkeypatch.setenv("SPECS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(REGISTRY, "tmp-model", _url_entry(source, "0" * 64))
    with pytest.raises(ModelNotAvailableError, match="expected 0000"):
        resolve("tmp-model")
    assert not list((tmp_path / "cache").rglob("x.pt"))


def test_unknown_name_lists_choices():
    with pytest.raises(FileNotFoundError, match="specs-b32"):
        resolve("no-such-model")


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("SPECS_CACHE", raising=False)
    assert pretrained.cache_dir().name == "specs_metric"
