"""open_clip-style OpenAI-layout files: GELU, non-64-wide heads, other MLP widths.

Expected embeddings come from a forward written here with plain tensor operations,
independently of ``specs_metric.models.model``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from factories import make_openai_state_dict
from specs_metric.cli import main
from specs_metric.errors import CheckpointError, ConfigError
from specs_metric.models.archs import ARCHS
from specs_metric.models.config import config_from_state_dict
from specs_metric.models.factory import model_from_checkpoint
from specs_metric.models.weights.checkpoint import save_state_dict
from specs_metric.models.weights.loading import read_checkpoint
from specs_metric.processing.tokenizer import default_tokenizer

# --------------------------------------------------------------- independent forward


def _ln(x, sd, prefix, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]


def _act(x, name):
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return x * torch.sigmoid(1.702 * x)


def _block(x, sd, p, head_width, act, causal):
    n, length, width = x.shape
    heads = width // head_width
    h = _ln(x, sd, f"{p}.ln_1")
    qkv = h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]
    q, k, v = (
        t.reshape(n, length, heads, head_width).transpose(1, 2) for t in qkv.split(width, -1)
    )
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_width)
    if causal:
        logits = logits + torch.full((length, length), float("-inf")).triu(1)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    x = x + out @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
    h = _ln(x, sd, f"{p}.ln_2")
    h = _act(h @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"], act)
    return x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]


def _layers(sd, prefix):
    return sum(1 for k in sd if k.startswith(prefix) and k.endswith("attn.in_proj_weight"))


def expected_image(sd, pixels, head_width, act):
    weight = sd["visual.conv1.weight"]
    width, _, patch, _ = weight.shape
    n, _, size, _ = pixels.shape
    g = size // patch
    patches = pixels.reshape(n, 3, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5)
    x = patches.reshape(n, g * g, -1) @ weight.reshape(width, -1).T
    cls = sd["visual.class_embedding"].expand(n, 1, width)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(_layers(sd, "visual.transformer.")):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}", head_width, act, False)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def expected_text(sd, ids, head_width, act):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    for i in range(_layers(sd, "transformer.")):
        x = _block(x, sd, f"transformer.resblocks.{i}", head_width, act, True)
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


def _relative(a, b):
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


IDS = default_tokenizer()(["a photo of a cat", "two dogs and a red ball on the grass"], 77)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _embeddings(checkpoint):
    model = model_from_checkpoint(checkpoint, reference_rounding=False)
    with torch.no_grad():
        return model.encode_text(IDS), model.encode_image(PIXELS)


def _open_clip_cfg(sd, head_width, quick_gelu=False, text_heads=None):
    vw, tw = sd["visual.conv1.weight"].shape[0], sd["ln_final.weight"].shape[0]
    return {
        "embed_dim": sd["text_projection"].shape[1],
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": vw, "patch_size": 16,
                       "head_width": head_width},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": tw,
                     "heads": text_heads or tw // head_width, "layers": 1},
    }  # fmt: skip


# --------------------------------------------------------------------------- tests


def test_gelu_32_wide_heads_with_an_open_clip_config(tmp_path):
    sd = make_openai_state_dict(seed=1, vision_width=96, text_width=64)
    path = save_state_dict(sd, tmp_path / "m.pt")
    arch = tmp_path / "ViT-tiny.json"
    arch.write_text(json.dumps(_open_clip_cfg(sd, 32)))
    text, image = _embeddings(read_checkpoint(path, arch=arch))
    assert _relative(text, expected_text(sd, IDS, 32, "gelu")) < 1e-5
    assert _relative(image, expected_image(sd, PIXELS, 32, "gelu")) < 1e-5
    # read with the OpenAI convention these widths cannot be split in 64-wide heads
    with pytest.raises(CheckpointError, match="vision width 96 is not a multiple of the head"):
        read_checkpoint(path)


def test_open_clip_file_uses_its_sidecar_config_or_is_refused(tmp_path):
    sd = make_openai_state_dict(seed=2, vision_width=128, text_width=128)
    path = save_state_dict(sd, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="open_clip checkpoint records neither"):
        read_checkpoint(path)
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": _open_clip_cfg(sd, 64), "preprocess_cfg": {"mean": [0.5] * 3}})
    )
    checkpoint = read_checkpoint(path)
    assert checkpoint.config.activation == "gelu" and checkpoint.preprocess.mean == (0.5,) * 3
    text, image = _embeddings(checkpoint)
    want_text = expected_text(sd, IDS, 64, "gelu")
    assert _relative(text, want_text) < 1e-5
    assert _relative(image, expected_image(sd, PIXELS, 64, "gelu")) < 1e-5
    # the same weights renamed read as QuickGELU: the error a silent misread would give
    renamed = save_state_dict(sd, tmp_path / "renamed.pt")
    misread_text, _ = _embeddings(read_checkpoint(renamed))
    assert _relative(misread_text, want_text) > 1e-3
    assert _relative(misread_text, expected_text(sd, IDS, 64, "quick_gelu")) < 1e-5


def test_mlp_width_other_than_4x_and_text_heads_other_than_vision(tmp_path):
    sd = make_openai_state_dict(seed=3, vision_width=160, text_width=128)
    gen = torch.Generator().manual_seed(4)
    for prefix in ("visual.transformer.resblocks.0", "transformer.resblocks.0"):
        width = sd[f"{prefix}.ln_1.weight"].shape[0]
        hidden = int(width * 2.5)
        sd[f"{prefix}.mlp.c_fc.weight"] = torch.randn(hidden, width, generator=gen) * width**-0.5
        sd[f"{prefix}.mlp.c_fc.bias"] = torch.randn(hidden, generator=gen) * 0.02
        sd[f"{prefix}.mlp.c_proj.weight"] = torch.randn(width, hidden, generator=gen) * hidden**-0.5
    arch = tmp_path / "a.json"
    arch.write_text(json.dumps(_open_clip_cfg(sd, 80, text_heads=4)))  # 32-wide text heads
    checkpoint = read_checkpoint(save_state_dict(sd, tmp_path / "m.pt"), arch=arch)
    assert (checkpoint.config.vision_heads, checkpoint.config.text_heads) == (2, 4)
    text, image = _embeddings(checkpoint)
    assert _relative(text, expected_text(sd, IDS, 32, "gelu")) < 1e-5
    assert _relative(image, expected_image(sd, PIXELS, 80, "gelu")) < 1e-5


def _meta_state(vision_width, text_width, patch=14, grid=16, embed=1024, mlp=4):
    """Only shapes (meta tensors): enough to read an architecture, no memory."""
    def t(*shape):
        return torch.empty(*shape, device="meta")

    sd = {
        "visual.conv1.weight": t(vision_width, 3, patch, patch),
        "visual.positional_embedding": t(grid * grid + 1, vision_width),
        "visual.proj": t(vision_width, embed),
        "text_projection": t(text_width, embed),
        "token_embedding.weight": t(49408, text_width),
        "positional_embedding": t(77, text_width),
        "ln_final.weight": t(text_width),
    }
    for prefix, width in (("visual.transformer.", vision_width), ("transformer.", text_width)):
        sd[f"{prefix}resblocks.0.attn.in_proj_weight"] = t(3 * width, width)
        sd[f"{prefix}resblocks.0.mlp.c_fc.weight"] = t(mlp * width, width)
    return sd


def test_vit_h_14_needs_its_arch():
    sd = _meta_state(1280, 1024)
    with pytest.raises(ConfigError, match="pass --arch"):
        config_from_state_dict(sd)
    config = config_from_state_dict(sd, ARCHS["ViT-H-14"].pins)
    assert (config.vision_heads, config.text_heads, config.activation) == (16, 16, "gelu")
    quick = config_from_state_dict(sd, ARCHS["ViT-H-14-quickgelu"].pins)
    assert quick.activation == "quick_gelu"
    with pytest.raises(ConfigError, match="vision_width: .* says 1024, the weights have 1280"):
        config_from_state_dict(sd, ARCHS["ViT-L-14"].pins)


def test_arch_table_follows_open_clip_model_configs():
    # Values of open_clip's src/open_clip/model_configs/<name>.json: head_width (default
    # 64), "quick_gelu" only in the -quickgelu variants, widths and patch sizes.
    expected = {
        "ViT-B-32": (768, 32, 512, 64, "gelu"),
        "ViT-B-16": (768, 16, 512, 64, "gelu"),
        "ViT-L-14": (1024, 14, 768, 64, "gelu"),
        "ViT-H-14": (1280, 14, 1024, 80, "gelu"),
        "ViT-g-14": (1408, 14, 1024, 88, "gelu"),
        "ViT-bigG-14": (1664, 14, 1280, 104, "gelu"),
        "ViT-B-32-quickgelu": (768, 32, 512, 64, "quick_gelu"),
        "ViT-H-14-quickgelu": (1280, 14, 1024, 80, "quick_gelu"),
    }
    for name, (vw, patch, tw, head, act) in expected.items():
        pins = ARCHS[name].pins
        got = (pins["vision_width"], pins["vision_patch_size"], pins["text_width"],
               pins["vision_head_width"], pins["activation"])  # fmt: skip
        assert got == (vw, patch, tw, head, act), name
        assert pins["text_head_width"] == 64


def test_cli_arch_name_list_and_convert_keeps_the_arch(tmp_path, capsys):
    assert main(["models", "--archs"]) == 0
    listed = capsys.readouterr().out
    assert "ViT-H-14 " in listed and "80-wide vision heads" in listed
    sd = make_openai_state_dict(seed=5, vision_width=96, text_width=64)
    src = save_state_dict(sd, tmp_path / "m.pt")
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(_open_clip_cfg(sd, 32)))
    out = tmp_path / "m.safetensors"
    assert main(["convert", str(src), str(out), "--keep-context", "--arch", str(arch)]) == 0
    text, _ = _embeddings(read_checkpoint(out))  # no --arch: the metadata has it
    assert _relative(text, expected_text(sd, IDS, 32, "gelu")) < 1e-5
    assert main(["convert", str(out), str(tmp_path / "x.pt"), "--arch", "openai"]) == 2
    assert "--arch openai says quick_gelu" in capsys.readouterr().err
