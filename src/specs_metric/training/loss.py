"""The SPECS specificity objective.

For a batch of images ``I``, full captions ``C``, base captions ``B`` (first i+1 detail
segments), detail captions ``D`` (first i+2 segments) and negatives ``N`` (B plus a segment
of another image), with ``s(x, I) = scale * cos(x, I)``:

    L = lc * CE(s(C, I_all), diagonal)              # text -> image only
      + ld * mean(relu(m_d + s(B, I) - s(D, I)))     # a correct detail must raise the score
      + ln * mean(relu(m_n + s(N, I) - s(B, I)))     # a wrong detail must lower it

With a fixed margin ``margin > 0`` both hinge terms use it (``m_d = m_n = margin``). With
``margin == 0`` the margin is adaptive and shared, as in the released training run: it
starts at 0; the detail term uses the running value, which is then set to
``clamp(mean(s(D, I)) - mean(s(B, I)), 0, max_margin)`` (detached); the negative term uses
that new value, after which the margin becomes ``clamp(mean(s(B, I)) - mean(s(N, I)), 0,
max_margin)``. The running value persists across calls (a buffer, so it is saved with the
loss's state dict) and is measured in logit units (after ``scale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specs_metric.errors import UsageError


@dataclass
class LossOutput:
    """Result of one loss evaluation. Components are unweighted; ``total`` is weighted.

    Attributes:
        total: ``lc * contrastive + ld * detail + ln * negative`` (differentiable).
        contrastive: text -> image cross-entropy of the full captions.
        detail: mean hinge ``relu(m_d + s(B, I) - s(D, I))``.
        negative: mean hinge ``relu(m_n + s(N, I) - s(B, I))``.
        detail_margin: ``m_d`` used by the detail term.
        negative_margin: ``m_n`` used by the negative term.
        margin: the running margin after this call (the fixed margin when fixed).
    """

    total: torch.Tensor
    contrastive: torch.Tensor
    detail: torch.Tensor
    negative: torch.Tensor
    detail_margin: float
    negative_margin: float
    margin: float

    def scalars(self) -> dict[str, float]:
        """Plain floats for logging."""
        return {
            "loss": float(self.total.detach()),
            "contrastive": float(self.contrastive.detach()),
            "detail": float(self.detail.detach()),
            "negative": float(self.negative.detach()),
            "margin": self.margin,
        }


class SpecificityLoss(nn.Module):
    """The specificity objective of SPECS (see the module docstring).

    Args:
        lambda_contrast: weight ``lc`` of the contrastive term (released recipe: 1).
        lambda_detail: weight ``ld`` of the detail hinge (released recipe: 8).
        lambda_neg: weight ``ln`` of the negative hinge (released recipe: 0.8).
        margin: fixed margin in logit units; 0 selects the adaptive shared margin (released).
        max_margin: upper clamp of the adaptive margin.

    Example:
        >>> loss = SpecificityLoss()
        >>> feats = [torch.eye(2)] * 5
        >>> out = loss(*feats, logit_scale=torch.tensor(10.0))
        >>> round(float(out.contrastive), 4), float(out.detail), out.margin
        (0.0, 0.0, 0.0)
    """

    def __init__(
        self,
        lambda_contrast: float = 1.0,
        lambda_detail: float = 8.0,
        lambda_neg: float = 0.8,
        margin: float = 0.0,
        max_margin: float = 1.5,
    ) -> None:
        super().__init__()
        if margin < 0:
            raise UsageError(f"margin must be >= 0 (0 = adaptive), got {margin}")
        self.lambda_contrast = float(lambda_contrast)
        self.lambda_detail = float(lambda_detail)
        self.lambda_neg = float(lambda_neg)
        self.fixed_margin = float(margin)
        self.max_margin = float(max_margin)
        self.register_buffer("running_margin", torch.zeros((), dtype=torch.float64))

    @property
    def adaptive(self) -> bool:
        """Whether the margin is adaptive (``margin == 0``)."""
        return self.fixed_margin == 0.0

    def reset_margin(self) -> None:
        """Set the adaptive margin back to its initial value, 0."""
        self.running_margin.zero_()

    def forward(
        self,
        image: torch.Tensor,
        caption: torch.Tensor,
        base: torch.Tensor,
        detail: torch.Tensor,
        negative: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> LossOutput:
        """Evaluate the objective.

        Args:
            image, caption, base, detail, negative: (N, D) embeddings of row-aligned
                examples (normalised here).
            logit_scale: the multiplicative scale, i.e. ``model.logit_scale.exp()``.
        """
        n = image.shape[0]
        for name, feats in (("caption", caption), ("base", base), ("detail", detail),
                            ("negative", negative)):
            if feats.shape != image.shape:
                raise ValueError(
                    f"{name} embeddings have shape {tuple(feats.shape)}, expected "
                    f"{tuple(image.shape)} like the image embeddings"
                )
        image = F.normalize(image.float(), dim=-1)
        logits = logit_scale * caption_logits(F.normalize(caption.float(), dim=-1), image)
        contrastive = F.cross_entropy(logits, torch.arange(n, device=image.device))

        s_base = logit_scale * (F.normalize(base.float(), dim=-1) * image).sum(-1)
        s_detail = logit_scale * (F.normalize(detail.float(), dim=-1) * image).sum(-1)
        s_neg = logit_scale * (F.normalize(negative.float(), dim=-1) * image).sum(-1)

        if self.adaptive:
            detail_margin = float(self.running_margin)
            detail_term = F.relu(detail_margin + s_base - s_detail).mean()
            negative_margin = self._update_margin(s_detail, s_base)
            negative_term = F.relu(negative_margin + s_neg - s_base).mean()
            margin = self._update_margin(s_base, s_neg)
        else:
            detail_margin = negative_margin = margin = self.fixed_margin
            detail_term = F.relu(margin + s_base - s_detail).mean()
            negative_term = F.relu(margin + s_neg - s_base).mean()

        total = (
            self.lambda_contrast * contrastive
            + self.lambda_detail * detail_term
            + self.lambda_neg * negative_term
        )
        return LossOutput(
            total, contrastive, detail_term, negative_term, detail_margin, negative_margin, margin
        )

    def _update_margin(self, bigger: torch.Tensor, smaller: torch.Tensor) -> float:
        gap = (bigger.detach().mean() - smaller.detach().mean()).clamp(0.0, self.max_margin)
        self.running_margin.fill_(float(gap))
        return float(self.running_margin)

    def extra_repr(self) -> str:
        margin = "adaptive" if self.adaptive else f"{self.fixed_margin:g}"
        return (
            f"lambda_contrast={self.lambda_contrast:g}, lambda_detail={self.lambda_detail:g}, "
            f"lambda_neg={self.lambda_neg:g}, margin={margin}"
        )


def caption_logits(captions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Unscaled (captions x images) cosine logits of normalised embeddings."""
    return captions @ images.t()


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP contrastive loss (mean of image->text and text->image cross-entropy).

    Used for contrastive pre-training (``objective="clip"``), not by SPECS fine-tuning.
    """
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    logits = logit_scale * image @ text.t()
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def grounding_loss(
    image: torch.Tensor,
    true_segments: torch.Tensor,
    false_segments: torch.Tensor,
    owner: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    pair_weight: float = 1.0,
    in_batch: float = 0.0,
) -> torch.Tensor:
    """Sentence-level grounding loss of the demo models' pre-training.

    Each true detail segment ``t_j`` of image ``owner[j]`` should score above its false
    version ``f_j`` (the segment of the matching negative caption): ``pair_weight`` times
    ``mean(softplus(s(f_j, I) - s(t_j, I)))`` on logit-scaled cosines. With ``in_batch > 0``
    each true segment must also pick its image among the batch's (``in_batch`` times the
    cross-entropy over the images).

    Args:
        image: (B, D) image embeddings.
        true_segments, false_segments: (P, D) embeddings of the paired segments.
        owner: (P,) index into ``image`` of each pair's image.
        logit_scale: the multiplicative scale, i.e. ``model.logit_scale.exp()``.
    """
    image = F.normalize(image.float(), dim=-1)
    true_segments = F.normalize(true_segments.float(), dim=-1)
    false_segments = F.normalize(false_segments.float(), dim=-1)
    s_true = logit_scale * (true_segments * image[owner]).sum(-1)
    s_false = logit_scale * (false_segments * image[owner]).sum(-1)
    loss = pair_weight * F.softplus(s_false - s_true).mean()
    if in_batch:
        picks = logit_scale * caption_logits(true_segments, image)
        loss = loss + in_batch * F.cross_entropy(picks, owner)
    return loss
