"""Fused oneDNN blocks (bf16 fast mode on the CPU): same function as the plain blocks."""

from __future__ import annotations

import copy

import pyarrow.parquet as pq
import pytest
import torch

from factories import make_state_dict
from specs_metric.models import fused
from specs_metric.models.factory import build_model
from specs_metric.models.model import ResidualAttentionBlock
from specs_metric.models.prefix import encode_chains
from specs_metric.processing.tokenizer import default_tokenizer
from specs_metric.scoring.scorer import Scorer
from specs_metric.synth import generate

pytestmark = pytest.mark.skipif(not fused.available(), reason="no oneDNN in this build")


def _model(width: int = 128, layers: int = 2):
    sd = make_state_dict(text_width=width, text_layers=layers, vision_width=width, seed=5)
    return build_model(sd, reference_rounding=False).eval()


@pytest.mark.parametrize("causal", [False, True])
def test_fused_block_in_fp32_equals_plain_block(causal):
    # In fp32 the fusion is pure algebra (scaled swish, residual epilogues, packed
    # weights): only float rounding may differ from the plain block.
    torch.manual_seed(0)
    block = ResidualAttentionBlock(128, 2)
    for p in block.parameters():
        p.data.normal_(0, 0.1)
    block.eval()
    fused_block = fused.FusedBlock(block, torch.float32, pooled=True)
    x = torch.randn(3, 11, 128)
    index = torch.tensor([10, 0, 6])
    with torch.inference_mode():
        torch.testing.assert_close(fused_block(x, causal), block(x, causal), atol=2e-5, rtol=0)
        torch.testing.assert_close(
            fused_block.forward_at(x, index, causal),
            block.forward_at(x, index, causal),
            atol=2e-5,
            rtol=0,
        )
        plain = block.mlp_residual(block.attention_residual(x, x))
        got = fused_block.mlp_residual(fused_block.attention_residual(x, x))
        torch.testing.assert_close(got, plain, atol=2e-5, rtol=0)
        torch.testing.assert_close(fused_block.qkv(x), block.qkv(x), atol=2e-5, rtol=0)


def test_bf16_scorer_fuses_and_stays_close_to_exact():
    model = _model()
    exact = Scorer(copy.deepcopy(model), device="cpu")
    fast = Scorer(model, device="cpu", precision="bf16")
    blocks = list(fast.model.transformer.resblocks) + list(fast.model.visual.transformer.resblocks)
    assert all(isinstance(b, fused.FusedBlock) for b in blocks)
    # fused kernels round differently from plain bf16: cached embeddings must not mix
    assert fast.numerics == "bf16/cpu/fused" and exact.numerics == "fp32"
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, 32, 32)
    texts = ["a red star", "a much longer caption about a blue ring left of a star", "x"]
    tokens = exact.tokenize(texts)[:, :20]
    with torch.inference_mode():
        for got, want in (
            (fast.model.encode_image(pixels), exact.model.encode_image(pixels)),
            (fast.model.encode_text(tokens), exact.model.encode_text(tokens)),
        ):
            assert got.dtype == torch.bfloat16
            cos = torch.nn.functional.cosine_similarity(got.float(), want, dim=-1)
            assert (cos > 0.999).all(), cos


def test_prefix_reuse_with_fused_blocks(tmp_path):
    # bench intrinsic runs attention itself from the blocks' pieces; with fused blocks
    # it must still equal plain encoding (in bf16: within bf16 rounding).
    generate(tmp_path, n=5, seed=2)
    fast = Scorer(_model(64, 2), device="cpu", precision="bf16")
    tok = default_tokenizer()
    row = pq.read_table(tmp_path / "test.parquet").to_pylist()[0]
    texts = row["captions"] + row["neg_captions"]
    chain = [tok.token_ids(t) for t in texts]
    with torch.inference_mode():
        got = encode_chains(fast.model, [chain], max_suffix=16)[0].float()
        want = torch.cat([fast.model.encode_text(torch.tensor([ids])) for ids in chain]).float()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert (cos > 0.999).all(), cos


def test_bf16_without_matrix_units_falls_back_to_exact(monkeypatch):
    # Emulated bf16 is several times slower than fp32: fast mode must never be slower.
    monkeypatch.setattr(fused, "native_bf16", lambda: False)
    model = _model(64, 1)
    exact = Scorer(copy.deepcopy(model), device="cpu")
    with pytest.warns(UserWarning, match="no bf16 matrix units"):
        fallback = Scorer(model, device="cpu", precision="bf16")
    assert fallback.precision == "fp32"
    assert isinstance(fallback.model.transformer.resblocks[0], ResidualAttentionBlock)
    tokens = exact.tokenize(["a red star in the top left"])[:, :12]
    with torch.inference_mode():
        assert torch.equal(fallback.model.encode_text(tokens), exact.model.encode_text(tokens))
