"""Training converts images to RGB before resizing (the reference's training script), scoring
after (the reference's scoring pipeline): identical on RGB, different on RGBA and palette."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from specs_metric.processing.transform import load_and_preprocess
from specs_metric.training.data import SpecificityDataset

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
RESOLUTION = 16


def _by_hand(image: Image.Image, rgb_first: bool) -> np.ndarray:
    """Shorter side to 16 (bicubic), centre crop, [0, 1], CLIP mean/std; RGB at either end."""
    if rgb_first:
        image = image.convert("RGB")
    w, h = image.size  # the fixtures are wider than tall
    image = image.resize((int(RESOLUTION * w / h), RESOLUTION), Image.BICUBIC)
    left = int(round((image.size[0] - RESOLUTION) / 2.0))
    image = image.crop((left, 0, left + RESOLUTION, RESOLUTION)).convert("RGB")
    pixels = np.asarray(image, dtype=np.float64) / 255
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def _image(mode: str) -> Image.Image:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, size=(24, 40, 4), dtype=np.uint8)
    rgba[..., 3] = rng.choice([0, 40, 255], size=(24, 40))  # transparent, faint, opaque
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        return image.convert("RGB").quantize(colors=16)
    return image.convert(mode)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _training_pixels(image: Image.Image) -> torch.Tensor:
    table = pa.table({"image": [_png(image)], "caption": ["a caption"],
                      "captions": [["a", "a b"]], "neg_captions": [["a c"]]})
    return SpecificityDataset(table, resolution=RESOLUTION)[0]["pixels"]


@pytest.mark.parametrize("mode", ["RGBA", "P", "RGB"])
def test_training_converts_to_rgb_before_resizing(mode):
    image = _image(mode)
    assert image.mode == mode
    trained = _training_pixels(image).double().numpy()
    scored = load_and_preprocess(_png(image), RESOLUTION).double().numpy()
    np.testing.assert_allclose(trained, _by_hand(image, rgb_first=True), atol=1e-5)
    np.testing.assert_allclose(scored, _by_hand(image, rgb_first=False), atol=1e-5)
    if mode == "RGB":
        np.testing.assert_allclose(trained, scored, atol=1e-6)
    else:  # the documented difference between the two recipes
        assert np.abs(trained - scored).max() > 0.1
