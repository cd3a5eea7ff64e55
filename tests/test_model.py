"""Model numerics against an independent, reference-style forward pass.

The independent pass follows the reference encoders literally: full 248-token padding, the
masked sum of the two positional tables, ``nn.MultiheadAttention`` in (L, N, D) layout with
an additive -inf causal mask, and fp16-rounded Conv/Linear/projection weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from factories import make_openai_state_dict, make_state_dict
from specs_metric.errors import CheckpointError
from specs_metric.models.factory import build_model
from specs_metric.models.model import config_from_state_dict, is_fp16_rounded
from specs_metric.models.weights.checkpoint import stretch_positional_embedding
from specs_metric.processing.tokenizer import default_tokenizer

ROUNDED = {
    "visual.conv1.weight",
    "visual.proj",
    "text_projection",
}


def _rounded(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        linear = any(
            s in k for s in ("attn.in_proj_", "attn.out_proj.", "mlp.c_fc.", "mlp.c_proj.")
        )
        out[k] = v.half().float() if (linear or k in ROUNDED) else v
    return out


def _blocks(sd, prefix, x, layers, width, mask):
    heads = width // 64
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}."
        mha = nn.MultiheadAttention(width, heads)
        mha.in_proj_weight.data = sd[p + "attn.in_proj_weight"]
        mha.in_proj_bias.data = sd[p + "attn.in_proj_bias"]
        mha.out_proj.weight.data = sd[p + "attn.out_proj.weight"]
        mha.out_proj.bias.data = sd[p + "attn.out_proj.bias"]
        h = nn.functional.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = nn.functional.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = nn.functional.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + nn.functional.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


@torch.no_grad()
def reference_encode_text(sd, tokens):
    sd = _rounded(sd)
    width = sd["ln_final.weight"].shape[0]
    layers = len([k for k in sd if k.startswith("transformer.") and k.endswith("in_proj_weight")])
    ctx = sd["positional_embedding"].shape[0]
    mask1 = torch.zeros(ctx, 1)
    mask1[:20] = 1
    x = sd["token_embedding.weight"][tokens]
    x = x + sd["positional_embedding"] * mask1 + sd["positional_embedding_res"] * (1 - mask1)
    mask = torch.full((ctx, ctx), float("-inf")).triu_(1)
    x = _blocks(sd, "transformer", x.permute(1, 0, 2), layers, width, mask).permute(1, 0, 2)
    x = nn.functional.layer_norm(x, (width,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


@torch.no_grad()
def reference_encode_image(sd, pixels):
    sd = _rounded(sd)
    w = sd["visual.conv1.weight"]
    width, patch = w.shape[0], w.shape[-1]
    layers = len([k for k in sd if k.startswith("visual.") and k.endswith("in_proj_weight")])
    x = nn.functional.conv2d(pixels, w, stride=patch).reshape(len(pixels), width, -1)
    x = x.permute(0, 2, 1)
    cls = sd["visual.class_embedding"] + torch.zeros(len(pixels), 1, width)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = nn.functional.layer_norm(x, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _blocks(sd, "visual.transformer", x.permute(1, 0, 2), layers, width, None)
    x = x.permute(1, 0, 2)[:, 0]
    x = nn.functional.layer_norm(
        x, (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]
    )
    return x @ sd["visual.proj"]


CAPTIONS = [
    "a cat",
    "A red sofa with two cushions, a sleeping cat and a window behind it!",
    "word " * 300,  # over-long: truncated with EOT kept
    "",
]


@pytest.fixture(scope="module")
def sd():
    return make_state_dict(seed=3, vision_layers=2, text_layers=2, text_width=128)


def test_config_inferred_from_shapes(sd):
    cfg = config_from_state_dict(sd)
    assert (cfg.vision_width, cfg.vision_patch_size, cfg.image_resolution) == (64, 16, 32)
    assert (cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.vision_layers) == (128, 2, 2, 2)
    assert (cfg.context_length, cfg.embed_dim, cfg.vocab_size) == (248, 32, 49408)


def test_text_matches_reference_style_forward(sd):
    model = build_model(sd)
    tokens = default_tokenizer()(CAPTIONS, 248)
    expected = reference_encode_text(sd, tokens)
    assert torch.allclose(model.encode_text(tokens), expected, atol=1e-5, rtol=0)


def test_image_matches_reference_style_forward(sd):
    model = build_model(sd)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = reference_encode_image(sd, pixels)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), expected, atol=1e-5, rtol=0)


def test_padding_trim_is_exact(sd):
    model = build_model(sd)
    tokens = default_tokenizer()(CAPTIONS[:2], 248)
    longest = int(tokens.argmax(-1).max()) + 1
    with torch.no_grad():
        full = model.encode_text(tokens)
        trimmed = model.encode_text(tokens[:, :longest])
        one_by_one = torch.cat([model.encode_text(t[None, : int(t.argmax()) + 1]) for t in tokens])
    # Embeddings of norm ~10 in fp32: only summation-order rounding may differ.
    assert (full - trimmed).abs().max() < 2e-6
    assert (full - one_by_one).abs().max() < 2e-6


def test_reference_rounding_changes_weights_only_where_listed(sd):
    rounded = build_model(sd).state_dict()
    full = build_model(sd, reference_rounding=False).state_dict()
    for key, value in sd.items():
        if is_fp16_rounded(key):
            assert torch.equal(rounded[key], value.half().float()), key
        else:
            assert torch.equal(rounded[key], value), key
        assert torch.equal(full[key], value), key
    listed = {k for k in sd if is_fp16_rounded(k)}
    assert "visual.conv1.weight" in listed and "token_embedding.weight" not in listed
    assert not any("ln_" in k or "positional" in k or "class_embedding" in k for k in listed)


def test_layernorm_runs_in_fp32_for_half_inputs(sd):
    model = build_model(sd)
    ln = model.ln_final
    x = torch.randn(2, 5, 128)
    # fp16 (the reference's GPU dtype): normalised in fp32, then cast, exactly
    half = x.half()
    expected = nn.functional.layer_norm(half.float(), (128,), ln.weight, ln.bias).half()
    assert torch.equal(ln(half), expected)
    # bf16 (fast mode): PyTorch's mixed kernel, fp32 accumulation; at most 1 bf16 ulp apart
    bf = x.bfloat16()
    reference = nn.functional.layer_norm(bf.float(), (128,), ln.weight, ln.bias)
    got = ln(bf)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - reference).abs() <= reference.abs() * 2**-7 + 1e-6).all()


def test_resnet_checkpoint_is_refused():
    sd = {
        "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
        "visual.attnpool.positional_embedding": torch.zeros(50, 2048),
    }
    with pytest.raises(CheckpointError, match="ResNet"):
        build_model(sd, source="rn50.pt")


def test_wrong_shape_names_the_tensor(sd):
    broken = dict(sd)
    broken["ln_final.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*ln_final\.bias"):
        build_model(broken, source="bad.pt")


def test_stretching_follows_the_written_rule():
    table = torch.randn(77, 8, dtype=torch.float64)
    out = stretch_positional_embedding(table, exact=True)
    assert out.shape == (248, 8)
    assert torch.equal(out[:20], table[:20])
    for i in range(56):
        a, b = table[20 + i], table[21 + i]
        for k, (wa, wb) in enumerate([(1, 0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75)]):
            assert torch.allclose(out[20 + 4 * i + k], wa * a + wb * b, atol=1e-12)
    for k in range(4):
        assert torch.allclose(out[244 + k], table[76] + k / 4 * (table[76] - table[75]))


def test_clip_checkpoint_builds_with_77_positions():
    sd = make_openai_state_dict(seed=1)
    model = build_model(sd)
    assert model.context_length == 77 and not hasattr(model, "positional_embedding_res")
    tokens = default_tokenizer()(["a dog"], 77)
    assert model.encode_text(tokens).shape == (1, 32)
    with torch.no_grad():
        assert math.isfinite(float(model.encode_text(tokens).sum()))
