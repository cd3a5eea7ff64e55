"""The image encoder: content-hash dedupe, the LRU over the disk cache, per-item errors,
fixed-shape batches, and the places that embed images through it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from factories import make_state_dict
from specs_metric.errors import ImageError
from specs_metric.jobs.explain_files import ExplainConfig, explain_file
from specs_metric.models.factory import build_model
from specs_metric.processing.preprocess import PreprocessConfig
from specs_metric.processing.transform import load_and_preprocess
from specs_metric.scoring.cache import EmbeddingCache
from specs_metric.scoring.image_embeddings import ImageEncoder
from specs_metric.scoring.scorer import Scorer

TOL = 1e-5


def _scorer(preprocessing: PreprocessConfig | None = None) -> Scorer:
    return Scorer(build_model(make_state_dict(seed=3)), device="cpu", preprocessing=preprocessing)


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def _write(path: Path, seed: int) -> Path:
    _picture(seed).save(path)
    return path


def _expected(scorer: Scorer, image) -> np.ndarray:
    """The model's embedding of one image, preprocessed and encoded alone."""
    pixels = load_and_preprocess(image, scorer.preprocessing)
    with torch.no_grad():
        return scorer.model.encode_image(pixels[None])[0].numpy()


def _count_forwards(scorer: Scorer) -> list[int]:
    """Record the batch size of every forward pass of the image tower."""
    sizes: list[int] = []
    encode = scorer.encode_pixels_on_device

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        sizes.append(len(pixels))
        return encode(pixels)

    scorer.encode_pixels_on_device = counting
    return sizes


def test_same_bytes_under_two_paths_are_encoded_once(tmp_path):
    scorer = _scorer()
    a = _write(tmp_path / "a.png", 0)
    b = tmp_path / "copy.png"
    shutil.copy(a, b)
    other = _write(tmp_path / "other.png", 1)
    sizes = _count_forwards(scorer)
    encoder = ImageEncoder(scorer, batch_size=8)
    result = encoder.embed([a, b, other, a.read_bytes()])
    assert sizes == [2] and encoder.encoded == 2 and result.errors == []
    emb = result.embeddings.numpy()
    for row, image in ((0, a), (1, a), (2, other), (3, a)):
        np.testing.assert_allclose(emb[row], _expected(scorer, image), atol=TOL)
    # Scorer.embed_images dedupes by content too
    sizes.clear()
    scorer.embed_images([a, b])
    assert sizes == [1]


def test_rewritten_file_at_one_path_gives_its_new_embedding(tmp_path):
    scorer = _scorer()
    path = _write(tmp_path / "img.png", 0)
    encoder = ImageEncoder(scorer)
    first = encoder.embed([path]).embeddings[0].numpy()
    old = _expected(scorer, path)
    _write(path, 7)
    second = encoder.embed([path]).embeddings[0].numpy()
    np.testing.assert_allclose(second, _expected(scorer, path), atol=TOL)
    assert np.abs(second - old).max() > 100 * TOL and np.abs(first - old).max() < TOL
    assert encoder.encoded == 2


def test_memory_is_a_bounded_lru(tmp_path):
    scorer = _scorer()
    paths = [_write(tmp_path / f"{i}.png", i) for i in range(4)]
    keys = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    encoder = ImageEncoder(scorer, batch_size=1, capacity=2)
    for p in paths:
        encoder.embed([p])
    assert list(encoder.memory) == keys[2:] and encoder.encoded == 4
    encoder.embed([paths[3]])  # still in memory
    assert encoder.encoded == 4
    encoder.embed([paths[0]])  # dropped: encoded again, and the oldest entry leaves
    assert encoder.encoded == 5 and list(encoder.memory) == [keys[3], keys[0]]


def test_bad_images_are_per_item_errors_and_good_rows_stay_intact(tmp_path):
    scorer = _scorer()
    good = _write(tmp_path / "good.png", 0)
    missing = tmp_path / "missing.png"
    text = tmp_path / "text.png"
    text.write_text("not an image")
    picture = _picture(5)
    result = ImageEncoder(scorer, batch_size=2).embed([good, missing, text, picture, b""])
    assert [i for i, _ in result.errors] == [1, 2, 4]
    messages = dict(result.errors)
    assert str(missing) in messages[1] and "not found" in messages[1]
    assert str(text) in messages[2] and "not a recognised image" in messages[2]
    assert "empty" in messages[4]
    assert result.ok.tolist() == [True, False, False, True, False]
    emb = result.embeddings.numpy()
    assert not emb[[1, 2, 4]].any()
    np.testing.assert_allclose(emb[0], _expected(scorer, good), atol=TOL)
    np.testing.assert_allclose(emb[3], _expected(scorer, picture), atol=TOL)
    # the API raises, naming the first bad image
    with pytest.raises(ImageError, match="missing.png"):
        scorer.embed_images([good, missing, text])


def test_a_damaged_disk_entry_is_recomputed_and_rewritten(tmp_path):
    scorer = _scorer()
    damaged = _write(tmp_path / "damaged.png", 0)
    sound = _write(tmp_path / "sound.png", 1)
    disk = EmbeddingCache(tmp_path / "cache", "fingerprint", dim=scorer.embed_dim)
    damaged_key = hashlib.sha256(damaged.read_bytes()).hexdigest()
    sound_key = hashlib.sha256(sound.read_bytes()).hexdigest()
    entry = disk.root / damaged_key[:2] / f"{damaged_key}.npy"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"\x93NUMPY torn")
    stored = np.arange(scorer.embed_dim, dtype=np.float32)
    disk.put(sound_key, stored)
    encoder = ImageEncoder(scorer, disk=disk)
    result = encoder.embed([damaged, sound])
    assert encoder.encoded == 1  # the sound entry is read, the damaged one recomputed
    np.testing.assert_array_equal(result.embeddings[1].numpy(), stored)
    np.testing.assert_allclose(result.embeddings[0].numpy(), _expected(scorer, damaged), atol=TOL)
    np.testing.assert_array_equal(np.load(entry), result.embeddings[0].numpy())


def test_fixed_shape_pads_batches_without_changing_or_leaking_rows(tmp_path):
    scorer = _scorer()
    paths = [_write(tmp_path / f"{i}.png", i) for i in range(6)]
    plain = ImageEncoder(scorer, batch_size=4).embed(paths).embeddings
    sizes = _count_forwards(scorer)
    disk = EmbeddingCache(tmp_path / "cache", "fingerprint", dim=scorer.embed_dim)
    encoder = ImageEncoder(scorer, batch_size=4, disk=disk, fixed_shape=True)
    result = encoder.embed(paths)
    assert sizes == [4, 4]  # the last batch of two padded to four
    assert result.embeddings.shape == (6, scorer.embed_dim) and result.errors == []
    assert (result.embeddings - plain).abs().max() <= 1e-6
    keys = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert encoder.encoded == 6 and set(encoder.memory) == keys
    assert {p.stem for p in disk.root.glob("*/*.npy")} == keys
    # the prepared path pads the same way
    sizes.clear()
    hashes = sorted(keys)[:3]
    pixels = {k: torch.zeros(3, 32, 32) + i for i, k in enumerate(hashes)}
    fresh = ImageEncoder(scorer, batch_size=4, fixed_shape=True)
    out = fresh.embed_prepared(hashes, pixels).embeddings
    assert sizes == [4] and out.shape == (3, scorer.embed_dim)
    with torch.no_grad():
        alone = scorer.model.encode_image(torch.stack([pixels[k] for k in hashes]))
    assert (out - alone).abs().max() <= 1e-6


def test_pil_images_are_keyed_by_their_pixels(tmp_path):
    scorer = _scorer()
    picture = _picture(0)
    changed = picture.copy()
    changed.putpixel((0, 0), (0, 0, 0) if picture.getpixel((0, 0)) != (0, 0, 0) else (9, 9, 9))
    sizes = _count_forwards(scorer)
    encoder = ImageEncoder(scorer)
    result = encoder.embed([picture, picture.copy(), changed])
    assert sizes == [2]  # the copy is the same picture, one changed pixel is another
    np.testing.assert_allclose(result.embeddings[1].numpy(), _expected(scorer, picture), atol=TOL)
    np.testing.assert_allclose(result.embeddings[2].numpy(), _expected(scorer, changed), atol=TOL)


def test_a_file_changed_before_it_is_read_again_is_a_row_error(tmp_path):
    scorer = _scorer()
    path = _write(tmp_path / "img.png", 0)
    key = hashlib.sha256(path.read_bytes()).hexdigest()
    encoder = ImageEncoder(scorer, capacity=1)
    result = encoder.embed_prepared([key], {}, {}, {key: path})  # dropped from memory
    np.testing.assert_allclose(result.embeddings[0].numpy(), _expected(scorer, path), atol=TOL)
    _write(path, 1)
    stale = ImageEncoder(scorer).embed_prepared([key, key], {}, {}, {key: path})
    assert stale.ok.tolist() == [False, False] and not stale.embeddings.any()
    assert [i for i, _ in stale.errors] == [0, 1] and "changed" in stale.errors[0][1]


def test_score_of_one_image_under_two_paths_equals_scoring_them_apart(tmp_path):
    scorer = _scorer()
    a = _write(tmp_path / "a.png", 0)
    b = tmp_path / "b.png"
    shutil.copy(a, b)
    captions = ["a small red square", "noise in many colours on a grey field"]
    sizes = _count_forwards(scorer)
    together = scorer.score([a, b], captions)
    assert sizes == [1]
    apart = [scorer.score([a], captions[:1])[0], scorer.score([b], captions[1:])[0]]
    np.testing.assert_allclose(together, apart, atol=1e-6)
    matrix = scorer.score_matrix([a, b], captions)
    np.testing.assert_allclose(matrix[0], matrix[1], atol=0)
    np.testing.assert_allclose(np.diag(matrix), apart, atol=1e-6)


def test_explain_file_uses_the_models_preprocessing(tmp_path):
    """``specs explain`` decoded images with the reference pipeline at the model's
    resolution, whatever preprocessing the model describes; `Scorer.explain` did not."""
    pre = PreprocessConfig(resize=36, crop=32, crop_rounding="floor", mean=(0.5,) * 3)
    scorer = _scorer(pre)
    _write(tmp_path / "img.png", 0)
    caption = "Colourful noise. It fills the frame."
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "image": "img.png", "caption": caption}) + "\n")
    out = tmp_path / "out.jsonl"
    explain_file(
        scorer, ExplainConfig(input=src, output=out, image_root=tmp_path, show_progress=False)
    )
    [rec] = [json.loads(line) for line in out.open()]
    [ex] = scorer.explain([tmp_path / "img.png"], [caption])
    assert rec["score"] == pytest.approx(ex.score, abs=TOL)
    assert scorer.score([tmp_path / "img.png"], [caption])[0] == pytest.approx(ex.score, abs=TOL)
