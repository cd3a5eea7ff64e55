"""HF ``transformers`` CLIP folders: parity with ``transformers`` itself, preprocessing,
conversion both ways, and every command accepting a ``save_pretrained`` folder."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from hf_factories import hf_features, random_clip, save_random_clip  # noqa: E402
from specs_metric.cli import main  # noqa: E402
from specs_metric.errors import CheckpointError
from specs_metric.models.weights.checkpoint import read_state_dict
from specs_metric.models.weights.loading import read_checkpoint  # noqa: E402
from specs_metric.processing.tokenizer import default_tokenizer  # noqa: E402
from specs_metric.scoring.scorer import load  # noqa: E402

LONG = " ".join(f"a red cube number {i} sits left of a small blue ring." for i in range(12))
CAPTIONS = ["a photo of a cat", "two dogs & a ball", LONG]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


# positions, activation, head width, widths (vision, text), layers, mlp ratio, eps
CASES = [
    (77, "quick_gelu", 64, (128, 128), 2, 4.0, 1e-5),
    (77, "gelu", 32, (96, 64), 1, 4.0, 1e-5),
    (77, "gelu", 80, (160, 160), 1, 3.0, 1e-6),
    (248, "quick_gelu", 32, (64, 96), 2, 4.0, 1e-5),
    (248, "gelu", 64, (128, 64), 1, 4.0, 1e-5),
    (248, "quick_gelu", 80, (160, 80), 1, 2.5, 1e-6),
]


@pytest.mark.parametrize("positions,act,head,widths,layers,ratio,eps", CASES)
def test_embeddings_match_transformers(tmp_path, positions, act, head, widths, layers, ratio, eps):
    kwargs = dict(positions=positions, act=act, head_width=head, vision_width=widths[0],
                  text_width=widths[1], layers=layers, mlp_ratio=ratio, eps=eps, seed=positions)
    model = random_clip(**kwargs)
    model.save_pretrained(tmp_path / "m")
    scorer = load(tmp_path / "m", device="cpu", reference_rounding=False)
    config = scorer.model.config
    heads = (config.vision_head_width, config.text_head_width)
    assert config.activation == act and heads == (head, head)
    assert config.context_length == positions and config.text_layer_norm_eps == eps
    ids = default_tokenizer()(CAPTIONS, context_length=positions)
    if positions == 248:
        assert int(ids.argmax(dim=1).max()) > 77  # positions past CLIP's 77 are used
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text_ref, image_ref = hf_features(model, ids, pixels)
    assert _relative(scorer.encode_tokens(ids), text_ref) < 1e-5
    assert _relative(scorer.encode_pixels(pixels), image_ref) < 1e-5


def test_preprocessing_follows_preprocessor_config(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = save_random_clip(tmp_path / "m")
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=mean, image_std=std,
    ).save_pretrained(folder)
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    scorer = load(folder, device="cpu")
    reference = load(folder, device="cpu", preprocess="reference")
    assert scorer.preprocessing.crop_rounding == "floor"
    differs = 0
    for size in [(32, 41), (45, 32), (37, 50), (32, 32)]:
        image = Image.effect_noise(size, 60).convert("RGB")
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(scorer.preprocess(image), expected, atol=2e-6, rtol=0)
        differs += not torch.allclose(reference.preprocess(image), expected, atol=1e-3)
    assert differs >= 2  # the reference pipeline (round, CLIP mean/std) is another one


def test_round_trip_hf_longclip_hf(tmp_path, capsys):
    model = random_clip(positions=248, act="gelu", head_width=32, vision_width=64, text_width=96)
    model.save_pretrained(tmp_path / "hf")
    mid = tmp_path / "longclip.safetensors"
    assert main(["convert", str(tmp_path / "hf"), str(mid)]) == 0
    openai = read_state_dict(mid)
    assert torch.equal(openai["positional_embedding"], openai["positional_embedding_res"])
    # the safetensors metadata keeps the architecture: no --arch needed to read it back
    again = read_checkpoint(mid)
    assert (again.config.activation, again.config.vision_head_width) == ("gelu", 32)
    assert again.preprocess.crop_rounding == "round"  # no preprocessor_config: reference
    assert main(["convert", str(mid), str(tmp_path / "back")]) == 0
    original = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    back = read_state_dict(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["text_config"]["hidden_act"] == "gelu"
    assert config["vision_config"]["num_attention_heads"] == 2


def test_longclip_to_hf_and_back_keeps_embeddings(tmp_path):
    from factories import make_state_dict
    from specs_metric.models.weights.checkpoint import save_state_dict

    src = save_state_dict(make_state_dict(seed=7), tmp_path / "long.pt")
    assert main(["convert", str(src), str(tmp_path / "hf")]) == 0
    from transformers import CLIPModel

    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    ours = load(src, device="cpu", reference_rounding=False)
    ids = default_tokenizer()(CAPTIONS, context_length=248)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    text_ref, image_ref = hf_features(hf, ids, pixels)
    assert _relative(ours.encode_tokens(ids), text_ref) < 1e-5
    assert _relative(ours.encode_pixels(pixels), image_ref) < 1e-5


def test_hf_77_position_model_is_stretched_for_longclip_output(tmp_path):
    save_random_clip(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "l.safetensors")]) == 0
    assert read_state_dict(tmp_path / "l.safetensors")["positional_embedding"].shape[0] == 248
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "c.pt"), "--keep-context"]) == 0
    assert read_state_dict(tmp_path / "c.pt")["positional_embedding"].shape[0] == 77


def test_config_that_contradicts_the_weights_is_an_error(tmp_path, capsys):
    folder = save_random_clip(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="text_mlp_width: .* says 256, the weights have 512"):
        read_checkpoint(folder)
    assert main(["convert", str(folder), str(tmp_path / "x.pt")]) == 2
    assert "text_mlp_width" in capsys.readouterr().err


def test_arch_that_contradicts_a_folder_is_an_error(tmp_path):
    folder = save_random_clip(tmp_path / "m", act="gelu")
    with pytest.raises(CheckpointError, match="activation: --arch openai says quick_gelu"):
        read_checkpoint(folder, arch="openai")


def test_unsupported_activation_is_refused(tmp_path):
    folder = save_random_clip(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_act"] = config["vision_config"]["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act 'relu' is not supported"):
        read_checkpoint(folder)


def test_pytorch_model_bin_and_shards(tmp_path):
    model = random_clip(act="gelu", head_width=32, vision_width=64, text_width=64)
    model.save_pretrained(tmp_path / "bin")
    # what older transformers wrote: a pickled state dict (read with weights_only=True)
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model.save_pretrained(tmp_path / "shards", max_shard_size="2MB")
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    ids = default_tokenizer()(CAPTIONS[:2], context_length=77)
    expected = hf_features(model, ids, torch.zeros(1, 3, 32, 32))[0]
    for folder in ("bin", "shards"):
        scorer = load(tmp_path / folder, device="cpu", reference_rounding=False)
        assert _relative(scorer.encode_tokens(ids), expected) < 1e-5


# ------------------------------------------------------------------ every command


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfcli")
    return save_random_clip(root / "model", positions=248, act="gelu", head_width=32,
                            vision_width=64, text_width=64)


def _images(folder, colours=("red", "green", "blue", "yellow")):
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (36 + i, 32), colour).save(folder / f"{colour}.png")
    return colours


def test_score_accepts_a_folder(hf_folder, tmp_path, capsys):
    colours = _images(tmp_path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"image": f"{c}.png", "caption": f"a {c} square"}) + "\n"
                            for c in colours))
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(hf_folder), "--input", str(rows), "--output", str(out),
                 "--device", "cpu", "--no-progress", "--full-precision-weights"]) == 0
    scores = [json.loads(line)["cosine"] for line in out.read_text().splitlines()]
    scorer = load(hf_folder, device="cpu", reference_rounding=False)
    expected = scorer.score([tmp_path / f"{c}.png" for c in colours],
                            [f"a {c} square" for c in colours], scale="cosine")
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)


def test_bench_commands_accept_a_folder(hf_folder, tmp_path):
    colours = _images(tmp_path / "imgs")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"image": f"imgs/{c}.png", "caption": f"a {c} square"}) + "\n"
        for c in colours))
    common = ["--model", str(hf_folder), "--device", "cpu"]
    assert main(["bench", "retrieval", *common, "--data", str(pairs), "--workers", "0",
                 "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    for c in colours:
        _images(tmp_path / "classes" / c, (c,))
    assert main(["bench", "zeroshot", *common, "--data", str(tmp_path / "classes"),
                 "--templates", "synthetic-colour", "--workers", "0", "--quiet",
                 "--json", str(tmp_path / "z.json")]) == 0
    from specs_metric.synth import generate

    generate(tmp_path / "world", n=4, seed=1)
    assert main(["bench", "intrinsic", *common, "--data", str(tmp_path / "world"),
                 "--json", str(tmp_path / "i.json"), "--limit", "2"]) == 0
    graded = tmp_path / "graded.jsonl"
    graded.write_text("".join(
        json.dumps({"id": f"r{i}", "image": f"imgs/{c}.png", "caption": f"a {c} square {i}",
                    "human_score": float(i % 3), "references": [f"a {c} square"]}) + "\n"
        for i, c in enumerate(colours * 2)))
    assert main(["bench", "human", "--data", str(graded), "--format", "generic",
                 "--metrics", f"S=specs@{hf_folder}", "--n-boot", "20", "--no-plots",
                 "--out", str(tmp_path / "human"), "--device", "cpu"]) == 0


def test_train_init_accepts_a_folder(hf_folder, tmp_path):
    from specs_metric.training.prepare import prepare_dataset

    colours = _images(tmp_path)
    rows = tmp_path / "in.jsonl"
    rows.write_text("\n".join(json.dumps(
        {"image": f"{c}.png", "caption": f"A {c} square. It has a thin {c} border."})
        for c in colours))
    prepare_dataset(rows, tmp_path / "train.parquet", progress=False, log_fn=lambda s: None)
    out = tmp_path / "run"
    assert main(["train", "--init", str(hf_folder), "--data", str(tmp_path / "train.parquet"),
                 "--output", str(out), "--max-steps", "1", "--batch-size", "4",
                 "--grad-accum", "1", "--workers", "0", "--precision", "fp32", "--quiet",
                 "--no-tensorboard"]) == 0
    trained = read_checkpoint(out / "model.safetensors")
    assert trained.config.activation == "gelu" and trained.config.text_head_width == 32


def test_explain_and_sweep_accept_a_folder(hf_folder, tmp_path):
    colours = _images(tmp_path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(
        json.dumps({"id": c, "image": f"{c}.png", "caption": f"A {c} square. It is small."})
        + "\n" for c in colours))
    out = tmp_path / "explain.jsonl"
    assert main(["explain", "--model", str(hf_folder), "--input", str(rows), "--output",
                 str(out), "--device", "cpu", "--no-progress"]) == 0
    explained = [json.loads(line) for line in out.read_text().splitlines()]
    scorer = load(hf_folder, device="cpu")
    full = scorer.score([tmp_path / f"{c}.png" for c in colours],
                        [f"A {c} square. It is small." for c in colours])
    assert [r["score"] for r in explained] == pytest.approx(full.tolist(), abs=1e-5)
    assert all(len(r["segments"]) == 2 for r in explained)
    assert main(["sweep", "--model", str(hf_folder), "--out", str(tmp_path / "sweep"),
                 str(rows), "--device", "cpu", "--no-progress", "--no-plots"]) == 0
