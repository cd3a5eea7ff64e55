"""Regenerate the reference-parity fixtures in this folder and the images in ``../images``.

This script is not part of the test suite. It imports the public SPECS reference implementation
(``model/longclip.py`` and friends from github.com/mbzuai-nlp/SPECS), runs it on the tiny
checkpoints and images of ``tests/factories.py``, and writes what it computes:

- ``tokens.json``: reference token ids for hard texts;
- ``preprocess.json`` and ``preprocess_32.npz``: reference image preprocessing (summaries at
  224 px, full tensors at 32 px);
- ``model.json``: reference embeddings, cosines and SPECS scores of tiny random checkpoints:
  248-position LongCLIP files read by ``longclip.load`` and a 77-position OpenAI-style
  TorchScript archive read by ``longclip.load_from_clip``;
- ``stretch.npz``: the reference's stretched positional tables (77 -> 248 rows), computed in
  fp32 (``input``/``output``) and, as ``load_from_clip`` does it, in fp16
  (``openai_tiny_input``/``openai_tiny_output``);
- ``meta.json``: the reference commit and library versions used.

Run it with a reference checkout (the folder holding its ``model`` package) in a separate
environment that has torchvision; ``meta.json`` records the versions used last. For example::

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch torchvision ftfy regex tqdm pillow numpy "setuptools<70"
    git clone https://github.com/mbzuai-nlp/SPECS /tmp/SPECS
    /tmp/refenv/bin/python tests/data/reference/make_fixtures.py --reference /tmp/SPECS \
        --commit "$(git -C /tmp/SPECS rev-parse HEAD)"

(``setuptools<70`` because the reference imports ``pkg_resources``.) Pin Pillow, ftfy and
regex to the project's versions: the fixtures record their decoding and text cleaning.

The project's tests never import the reference; they only read the files written here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
sys.path.insert(0, str(TESTS))

import factories  # noqa: E402

# The tiny checkpoints of model.json: name -> make_state_dict keyword arguments.
MODEL_CONFIGS = {
    # One attention head per tower (width 64).
    "tiny": dict(
        seed=0,
        embed_dim=32,
        vision_width=64,
        vision_layers=2,
        patch=16,
        resolution=32,
        text_width=64,
        text_layers=2,
    ),
    # Two heads per tower (width 128) and a 4x4 patch grid: catches head-splitting errors.
    "two_heads": dict(
        seed=1,
        embed_dim=16,
        vision_width=128,
        vision_layers=1,
        patch=8,
        resolution=32,
        text_width=128,
        text_layers=1,
    ),
}
MODEL_IMAGES = ("rgb_37x53", "large_640x481", "palette_61x47")
PREPROCESS_RESOLUTIONS = (224, 32)


def _long_text(words: int) -> str:
    rng = np.random.default_rng(5)
    vocab = "red blue small large dog cat tree house sky river car road man woman sits runs".split()
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), words)) + "."


# Texts for tokens.json: (label, text). Labels are stable identifiers used by the tests.
TOKEN_TEXTS = [
    ("plain", "A photo of a cat."),
    ("accents", "Café naïve résumé, déjà vu à Zürich — Ångström"),
    ("combining", "Cafe\u0301 nai\u0308ve"),
    ("cjk", "東京タワーの夜景、とても綺麗です。中文字幕 한국어"),
    ("emoji", "A dog 🐶 with a ball ⚽️, a family 👨‍👩‍👧 and a thumbs up 👍🏽!"),
    ("rtl", "مرحبا بالعالم and שלום עולם"),
    ("html_entities", "Tom &amp;amp; Jerry &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39;"),
    ("html_double", "fish &amp;amp;amp; chips &nbsp;&copy; 2024"),
    ("mojibake", "The Mona Lisa doesnâ€™t have eyebrows. Ã©tÃ© Ã  Paris"),
    ("whitespace", "  a\tcat\u00a0on a\nmat\r\n\u2003em\u2009thin\u200bzero  "),
    ("contractions", "I'm sure you'll LOVE it, isn't it? THEY'RE here, we've won, he'd go, it's"),
    ("capitals", "iPhone XS Max vs. GALAXY s10+ McDonald's NASA"),
    ("numbers", "In 1999, 3.14159 people paid $1,234.56 for 42nd-place 10x tickets at 7:30pm"),
    ("punctuation", "Wait... what?!?! --- ***!!! (((ok))) ... «quotes» “curly” ‘single’"),
    ("ligatures", "ﬁne ﬂower ½ cup ² ³ Ⅻ ＦＵＬＬ ｗｉｄｔｈ"),
    ("control", "bell\x07 null\x00 esc\x1b[31m red"),
    ("long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilistic"),
    ("empty", ""),
    ("only_spaces", " \t\n "),
    ("endoftext_inside", "a cat <|endoftext|> a dog"),
    ("startoftext_upper", "<|STARTOFTEXT|>Hello <|EndOfText|>world"),
    ("fits_exactly", "cat " * 246),
    ("one_too_many", "cat " * 247),
    ("over_long", _long_text(400)),
]

# Captions of model.json: short to over-long, with one embedded end-of-text token.
MODEL_CAPTIONS = [
    "a cat",
    "A photo of a small red house next to a river, under a cloudy sky.",
    "Café Zürich at night 🌃 with neon signs & people",
    _long_text(60),
    "a man <|endoftext|> walking a dog",
    _long_text(300),
]


def _f64(values) -> list:
    return np.asarray(values, dtype=np.float64).tolist()


def tokens_fixture(longclip) -> dict:
    records = []
    for label, text in TOKEN_TEXTS:
        record = {"label": label, "text": text}
        try:
            ids = longclip.tokenize([text], truncate=False)[0]
            record["raises_without_truncate"] = False
        except RuntimeError:
            ids = longclip.tokenize([text], truncate=True)[0]
            record["raises_without_truncate"] = True
        ids = [int(v) for v in ids]
        # Id 0 ("!") can occur inside a sequence, but EOT always ends it: keep up to EOT.
        last = max(i for i, v in enumerate(ids) if v != 0)
        record["ids"] = ids[: last + 1]
        record["context_length"] = len(ids)
        truncated_ids = [int(v) for v in longclip.tokenize([text], truncate=True)[0]]
        assert truncated_ids[: last + 1] == record["ids"]
        record["bpe"] = [int(v) for v in longclip._tokenizer.encode(text)]
        records.append(record)
    # The 77-token context of OpenAI CLIP, with truncation.
    short = []
    for label in ("plain", "over_long", "emoji"):
        text = dict(TOKEN_TEXTS)[label]
        ids = [int(v) for v in longclip.tokenize([text], context_length=77, truncate=True)[0]]
        short.append({"label": label, "text": text, "ids": ids})
    return {"context_length": 248, "texts": records, "context_77": short}


def _preprocess_summaries(longclip, images: dict[str, Path]):
    from PIL import Image

    summaries: dict[str, dict] = {}
    full32: dict[str, np.ndarray] = {}
    for name, path in images.items():
        entry: dict = {"file": path.name}
        with Image.open(path) as img:
            entry["decoded_mode"] = img.mode
            entry["decoded_size"] = list(img.size)
            img.load()
            entry["decoded_sum"] = float(np.asarray(img, dtype=np.float64).sum())
            for resolution in PREPROCESS_RESOLUTIONS:
                try:
                    pixels = longclip._transform(resolution)(img).numpy()
                except Exception as exc:  # recorded so the tests can expect the same refusal
                    entry[str(resolution)] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                entry[str(resolution)] = factories.pixel_summary(pixels)
                if resolution == 32:
                    full32[name] = pixels.astype(np.float32)
        summaries[name] = entry
    return summaries, full32


def _encode(model, preprocess, longclip, image_paths, captions) -> dict:
    import torch
    from PIL import Image

    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p)) for p in image_paths])
        image_emb = model.encode_image(pixels).double().numpy()
        tokens = longclip.tokenize(captions, truncate=True)
        text_emb = model.encode_text(tokens).double().numpy()
    # Cosines in float64 from the fp32 embeddings.
    img_n = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    txt_n = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    cosine = img_n @ txt_n.T
    return {
        "image_embeddings": _f64(image_emb),
        "text_embeddings": _f64(text_emb),
        "cosine": _f64(cosine),
        "specs": _f64(np.maximum(0.0, (cosine + 1.0) / 2.0)),
    }


def model_fixture(longclip, model_module, images: dict[str, Path], workdir: Path):
    image_paths = [images[n] for n in MODEL_IMAGES]
    out: dict = {"images": list(MODEL_IMAGES), "captions": MODEL_CAPTIONS, "models": {}}

    for name, config in MODEL_CONFIGS.items():
        path = factories.write_checkpoint(
            factories.make_state_dict(**config), workdir / f"{name}.pt", "pt"
        )
        model, preprocess = longclip.load(str(path), device="cpu")
        entry = {"kind": "longclip", "config": config}
        entry.update(_encode(model, preprocess, longclip, image_paths, MODEL_CAPTIONS))
        out["models"][name] = entry

    # OpenAI-style archive: fp16 weights as OpenAI stores them, 77 positions, integer extras.
    config = dict(MODEL_CONFIGS["tiny"])
    openai_sd = factories.make_openai_state_dict(**config)
    path = factories.write_checkpoint(
        factories.openai_half(openai_sd), workdir / "openai.pt", "torchscript"
    )
    model, preprocess = longclip.load_from_clip(str(path), device="cpu")
    entry = {"kind": "openai-torchscript-via-load_from_clip", "config": config}
    entry.update(_encode(model, preprocess, longclip, image_paths, MODEL_CAPTIONS))
    out["models"]["openai_tiny"] = entry

    arrays = stretch_fixture(longclip, model_module, openai_sd, workdir)
    # load_from_clip stretches the table in the model's dtype, which is fp16 at that point.
    arrays["openai_tiny_input"] = openai_sd["positional_embedding"].numpy()
    arrays["openai_tiny_output"] = model.positional_embedding.detach().numpy()
    return out, arrays


def stretch_fixture(longclip, model_module, openai_sd, workdir: Path) -> dict[str, np.ndarray]:
    """The reference stretching of a random 77-row table, computed in fp32.

    ``load_from_clip`` stretches in the dtype of ``visual.conv1`` (fp16 after the reference's
    weight conversion). With that conversion disabled the same code runs in fp32, which gives
    the exact formula; the fp16 variant is recorded in ``model.json`` under ``openai_tiny``.
    """
    import torch

    rng = np.random.default_rng(77)
    table = rng.normal(0.0, 0.5, size=(77, 64)).astype(np.float32)
    sd = dict(openai_sd)
    sd["positional_embedding"] = torch.from_numpy(table)
    # A TorchScript archive: the reference's plain-pickle fallback does not rewind the file
    # after the failed TorchScript attempt, so it cannot read a torch.save file.
    path = factories.write_checkpoint(sd, workdir / "openai_fp32.pt", "torchscript")
    original = model_module.convert_weights
    model_module.convert_weights = lambda model: None
    try:
        model, _ = longclip.load_from_clip(str(path), device="cpu")
    finally:
        model_module.convert_weights = original
    stretched = model.positional_embedding.detach()
    assert stretched.dtype == torch.float32
    assert torch.equal(stretched, model.positional_embedding_res.detach())
    return {"input": table, "output": stretched.numpy()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="SPECS checkout")
    parser.add_argument("--commit", default="unknown", help="commit of that checkout")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(args.reference.resolve()))
    warnings.filterwarnings("ignore")
    import ftfy
    import PIL
    import regex
    import torch
    import torchvision
    from model import longclip, model_longclip

    images = factories.write_test_images()
    preprocess, full32 = _preprocess_summaries(longclip, images)
    with tempfile.TemporaryDirectory() as tmp:
        models, stretch = model_fixture(longclip, model_longclip, images, Path(tmp))

    meta = {
        "reference": "github.com/mbzuai-nlp/SPECS",
        "reference_commit": args.commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "ftfy": ftfy.__version__,
        "regex": regex.__version__,
    }
    files = {
        "tokens.json": tokens_fixture(longclip),
        "preprocess.json": {"resolutions": list(PREPROCESS_RESOLUTIONS), "images": preprocess},
        "model.json": models,
        "meta.json": meta,
    }
    for name, content in files.items():
        with open(HERE / name, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1, ensure_ascii=True)
            f.write("\n")
    np.savez_compressed(HERE / "preprocess_32.npz", **full32)
    np.savez_compressed(HERE / "stretch.npz", **stretch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
