"""SpecificityLoss against values computed by hand and by a plain-Python transcription of
docs/training.md "Objective" (math module, loops, no torch ops)."""

from __future__ import annotations

import math

import pytest
import torch

from specs_metric.training import SpecificityLoss, clip_loss

# Hand example (D = 2, scale 10). Images are the two axes; every vector has unit norm,
# so each cosine is read off directly:
#   s(C, I) = 10 * identity            -> contrastive = log(1 + e^-10) per row
#   s_B = [6, 6], s_D = [8, 0], s_N = [0, 8]
IMAGE = [[1.0, 0.0], [0.0, 1.0]]
CAPTION = [[1.0, 0.0], [0.0, 1.0]]
BASE = [[0.6, 0.8], [0.8, 0.6]]
DETAIL = [[0.8, 0.6], [1.0, 0.0]]
NEGATIVE = [[0.0, 1.0], [0.6, 0.8]]
CONTRASTIVE = math.log1p(math.exp(-10.0))


def _tensors(scale_rows: float = 1.0):
    # Embeddings need not be normalised: scale every row to check the loss normalises.
    return [torch.tensor(x) * scale_rows for x in (IMAGE, CAPTION, BASE, DETAIL, NEGATIVE)]


def test_adaptive_margin_by_hand():
    loss = SpecificityLoss(lambda_contrast=1.0, lambda_detail=8.0, lambda_neg=0.8, margin=0.0)
    out = loss(*_tensors(3.0), logit_scale=torch.tensor(10.0))
    # detail: margin 0 -> mean(relu(6 - 8), relu(6 - 0)) = mean(0, 6) = 3
    # margin <- clamp(mean(s_D) - mean(s_B), 0, 1.5) = clamp(4 - 6) = 0
    # negative: mean(relu(0 + 0 - 6), relu(0 + 8 - 6)) = mean(0, 2) = 1
    # margin <- clamp(mean(s_B) - mean(s_N), 0, 1.5) = clamp(6 - 4) = 1.5
    assert out.contrastive.item() == pytest.approx(CONTRASTIVE, abs=1e-6)
    assert out.detail.item() == pytest.approx(3.0, abs=1e-5)
    assert out.negative.item() == pytest.approx(1.0, abs=1e-5)
    assert (out.detail_margin, out.negative_margin) == (0.0, 0.0)
    assert out.margin == pytest.approx(1.5)
    assert out.total.item() == pytest.approx(CONTRASTIVE + 8 * 3 + 0.8 * 1, abs=1e-4)
    # The margin persists: the second call's detail term uses 1.5.
    out = loss(*_tensors(), logit_scale=torch.tensor(10.0))
    # detail: mean(relu(1.5 + 6 - 8), relu(1.5 + 6 - 0)) = mean(0, 7.5) = 3.75
    assert out.detail_margin == pytest.approx(1.5)
    assert out.detail.item() == pytest.approx(3.75, abs=1e-5)
    assert out.negative.item() == pytest.approx(1.0, abs=1e-5)
    loss.reset_margin()
    assert float(loss.running_margin) == 0.0


def test_fixed_margin_by_hand():
    loss = SpecificityLoss(lambda_contrast=2.0, lambda_detail=8.0, lambda_neg=0.8, margin=1.0)
    out = loss(*_tensors(0.5), logit_scale=torch.tensor(10.0))
    # detail: mean(relu(1 + 6 - 8), relu(1 + 6 - 0)) = mean(0, 7) = 3.5
    # negative: mean(relu(1 + 0 - 6), relu(1 + 8 - 6)) = mean(0, 3) = 1.5
    assert out.detail.item() == pytest.approx(3.5, abs=1e-5)
    assert out.negative.item() == pytest.approx(1.5, abs=1e-5)
    assert out.margin == out.detail_margin == out.negative_margin == 1.0
    assert out.total.item() == pytest.approx(2 * CONTRASTIVE + 28.0 + 1.2, abs=1e-4)
    # A fixed margin never moves.
    assert loss(*_tensors(), logit_scale=torch.tensor(10.0)).margin == 1.0


def test_contrastive_is_text_to_image_only():
    # Both captions point at image 0: rows are [10, 0] and [10, 0].
    # text->image CE = (log(1 + e^-10) + log(1 + e^10)) / 2 = 5 + log(1 + e^-10)
    # (image->text would be log 2 for both images.)
    loss = SpecificityLoss()
    image, _, base, detail, negative = _tensors()
    caption = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = loss(image, caption, base, detail, negative, logit_scale=torch.tensor(10.0))
    assert out.contrastive.item() == pytest.approx(5.0 + CONTRASTIVE, rel=1e-5)
    symmetric = clip_loss(image, caption, torch.tensor(10.0))
    assert symmetric.item() == pytest.approx((5.0 + CONTRASTIVE + math.log(2)) / 2, rel=1e-5)


def _plain_reference(rows, scale, lambdas, fixed_margin, start_margin):
    """Guide §4 with Python floats: returns (total, c, d, n, margin_after)."""

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    img, cap, base, det, neg = ([unit(v) for v in block] for block in rows)
    n = len(img)
    contrastive = 0.0
    for i in range(n):
        logits = [scale * dot(cap[i], img[j]) for j in range(n)]
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(v - top) for v in logits))
        contrastive += (log_sum - logits[i]) / n
    s_b = [scale * dot(base[i], img[i]) for i in range(n)]
    s_d = [scale * dot(det[i], img[i]) for i in range(n)]
    s_n = [scale * dot(neg[i], img[i]) for i in range(n)]
    m = fixed_margin if fixed_margin > 0 else start_margin
    detail = sum(max(0.0, m + s_b[i] - s_d[i]) for i in range(n)) / n
    if fixed_margin == 0:
        m = min(max(sum(s_d) / n - sum(s_b) / n, 0.0), 1.5)
    negative = sum(max(0.0, m + s_n[i] - s_b[i]) for i in range(n)) / n
    if fixed_margin == 0:
        m = min(max(sum(s_b) / n - sum(s_n) / n, 0.0), 1.5)
    lc, ld, ln = lambdas
    return lc * contrastive + ld * detail + ln * negative, contrastive, detail, negative, m


@pytest.mark.parametrize("fixed_margin", [0.0, 0.7])
def test_random_batches_match_plain_python(fixed_margin):
    gen = torch.Generator().manual_seed(3)
    lambdas = (1.0, 8.0, 0.8)
    loss = SpecificityLoss(*lambdas, margin=fixed_margin)
    margin = 0.0
    for _ in range(4):  # several calls: the adaptive margin carries over
        # Close vectors so that the hinge terms are active and the margin lands inside (0, 1.5).
        anchor = torch.randn(5, 6, generator=gen)
        blocks = [anchor + 0.02 * torch.randn(5, 6, generator=gen) for _ in range(5)]
        scale = 100.0
        expected = _plain_reference(
            [b.double().tolist() for b in blocks], scale, lambdas, fixed_margin, margin
        )
        out = loss(*blocks, logit_scale=torch.tensor(scale))
        got = (out.total.item(), out.contrastive.item(), out.detail.item(), out.negative.item(),
               out.margin)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)
        margin = expected[-1]


def test_gradients_flow_to_every_input():
    tensors = [t.clone().requires_grad_(True) for t in _tensors()]
    scale = torch.tensor(10.0, requires_grad=True)
    SpecificityLoss(margin=1.0)(*tensors, logit_scale=scale).total.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors)
    assert scale.grad is not None


def test_margin_saved_in_state_dict_and_bad_shapes_rejected():
    loss = SpecificityLoss()
    loss(*_tensors(), logit_scale=torch.tensor(10.0))
    restored = SpecificityLoss()
    restored.load_state_dict(loss.state_dict())
    assert float(restored.running_margin) == 1.5
    with pytest.raises(ValueError, match="negative embeddings"):
        image, caption, base, detail, _ = _tensors()
        loss(image, caption, base, detail, torch.zeros(3, 2), logit_scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="margin"):
        SpecificityLoss(margin=-1)
