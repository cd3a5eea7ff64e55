"""Intrinsic specificity benchmark (README, "The intrinsic specificity benchmark") with
prefix-sharing text encoding.

For each image with cumulative captions ``c_1..c_n`` and negatives ``n_2..n_n``
(``n_k = c_{k-1} + a segment that is wrong for the image``) and ``s`` the cosine of image
and text embeddings:

* positive rate = fraction of ``k in 1..n-1`` with ``s(c_{k+1}) > s(c_k)``;
* negative rate = fraction of ``k in 2..n`` with ``s(c_k) > s(n_k)``;

images with fewer than two increments (``n < 3``) are skipped for both rates, and the
benchmark reports the mean over images in percent and the average of the two means.
Comparisons are strict: a tie counts as a failure.

Cumulative captions share prefixes. The text tower is causal, so the hidden states of a
shared prefix are the same in every caption that starts with it. :func:`encode_chains`
runs the longest caption of a chain once, keeps each layer's keys and values, and then
computes only the tokens after the shared prefix of every other caption (for ``c_k`` just
its EOT; for ``n_k`` the wrong segment and its EOT) against those cached keys and values.
A chain then costs about as much as its longest caption instead of the sum of all of them.
Captions whose tokens do not extend the chain's longest caption far enough are encoded
plainly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from specs_metric.bench.sdci import SdciRow, load_image_source
from specs_metric.model import LongCLIP
from specs_metric.scales import cosine_similarity
from specs_metric.scorer import Scorer

# Captions whose part after the shared prefix is longer than this are encoded plainly.
DEFAULT_MAX_SUFFIX = 48


# --------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------


@dataclass
class ImageRates:
    """Rates of one image (``None`` when the image is skipped)."""

    positive: float | None
    negative: float | None


def image_rates(caption_scores: Sequence[float], neg_scores: Sequence[float]) -> ImageRates:
    """Positive and negative rate (fractions) of one image.

    Args:
        caption_scores: scores of ``c_1..c_n``.
        neg_scores: scores of ``n_2..n_n``; ``neg_scores[j]`` pairs with
            ``caption_scores[j + 1]``.
    """
    c = np.asarray(caption_scores, dtype=np.float64)
    n = np.asarray(neg_scores, dtype=np.float64)
    if len(n) != max(len(c) - 1, 0):
        raise ValueError(f"{len(c)} captions need {max(len(c) - 1, 0)} negatives, got {len(n)}")
    if len(c) - 1 < 2:
        return ImageRates(None, None)
    return ImageRates(float(np.mean(c[1:] > c[:-1])), float(np.mean(c[1:] > n)))


@dataclass
class IntrinsicResult:
    """Benchmark result: means over the images that were not skipped, in percent."""

    positive: float
    negative: float
    average: float
    n_images: int
    n_skipped: int
    per_image: list[ImageRates] = field(repr=False)


def intrinsic_rates(
    caption_scores: Sequence[Sequence[float]], neg_scores: Sequence[Sequence[float]]
) -> IntrinsicResult:
    """Guide §6 rates over images from per-image caption and negative scores."""
    if len(caption_scores) != len(neg_scores):
        raise ValueError(f"{len(caption_scores)} caption lists but {len(neg_scores)} negatives")
    per_image = [image_rates(c, n) for c, n in zip(caption_scores, neg_scores, strict=True)]
    kept = [r for r in per_image if r.positive is not None]
    if not kept:
        raise ValueError("no image has at least 3 cumulative captions; nothing to score")
    positive = 100.0 * float(np.mean([r.positive for r in kept]))
    negative = 100.0 * float(np.mean([r.negative for r in kept]))
    return IntrinsicResult(
        positive=positive,
        negative=negative,
        average=(positive + negative) / 2.0,
        n_images=len(kept),
        n_skipped=len(per_image) - len(kept),
        per_image=per_image,
    )


# --------------------------------------------------------------------------------------
# Prefix-sharing text encoding
# --------------------------------------------------------------------------------------


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Group:
    """Suffixes of one length bucket, laid out (chains C, items I, suffix length S)."""

    tokens: torch.Tensor  # (C, I, S) ids, zero padded
    positions: torch.Tensor  # (C, I, S) absolute positions
    prefix: torch.Tensor  # (C, I) shared-prefix length P: the trunk keys 0..P-1 are visible
    pool: torch.Tensor  # (C, I) index of the pooled (EOT) token inside the suffix
    targets: list[tuple[int, int, int]]  # (chain, item, output row) of the real items

    def to(self, device: torch.device) -> _Group:
        return _Group(
            self.tokens.to(device),
            self.positions.to(device),
            self.prefix.to(device),
            self.pool.to(device),
            self.targets,
        )


def _make_group(
    items: list[tuple[int, int, int, list[int], int]], n_chains: int, context: int
) -> _Group:
    """Lay out suffix items ``(chain, row, prefix, suffix, pool)`` per chain."""
    per_chain: list[list[tuple[int, int, int, list[int], int]]] = [[] for _ in range(n_chains)]
    for it in items:
        per_chain[it[0]].append(it)
    n_items = max(len(c) for c in per_chain)
    s_len = max(len(it[3]) for it in items)
    tokens = torch.zeros(n_chains, n_items, s_len, dtype=torch.long)
    prefix = torch.zeros(n_chains, n_items, dtype=torch.long)
    pool = torch.zeros(n_chains, n_items, dtype=torch.long)
    targets = []
    for ci, chain_items in enumerate(per_chain):
        for ii, (_, row, p, suffix, pooled) in enumerate(chain_items):
            tokens[ci, ii, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
            prefix[ci, ii] = p
            pool[ci, ii] = pooled
            targets.append((ci, ii, row))
    # Padding positions only feed padding queries; clamp them into the table.
    positions = (prefix[..., None] + torch.arange(s_len)).clamp(max=context - 1)
    return _Group(tokens, positions, prefix, pool, targets)


def _suffix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_trunk: torch.Tensor,
    v_trunk: torch.Tensor,
    prefix: torch.Tensor,
) -> torch.Tensor:
    """Attention of suffix queries over their trunk prefix and their own causal suffix.

    Shapes: q, k, v (C, H, I, S, d); k_trunk, v_trunk (C, H, T, d); prefix (C, I).
    Returns (C, H, I, S, d). The softmax runs over the two key blocks jointly (one shared
    maximum and denominator) without concatenating them.
    """
    q = q * q.shape[-1] ** -0.5
    t_len, s_len = k_trunk.shape[2], q.shape[3]
    s_trunk = torch.einsum("chisd,chtd->chist", q, k_trunk).float()
    s_self = torch.matmul(q, k.transpose(-1, -2)).float()
    visible = torch.arange(t_len, device=q.device) < prefix[:, None, :, None, None]
    causal = torch.ones(s_len, s_len, dtype=torch.bool, device=q.device).tril()
    s_trunk.masked_fill_(~visible, float("-inf"))
    s_self.masked_fill_(~causal, float("-inf"))
    # Every query sees at least its own key, so the maximum is finite.
    top = torch.maximum(s_trunk.amax(-1, keepdim=True), s_self.amax(-1, keepdim=True))
    e_trunk = s_trunk.sub_(top).exp_()
    e_self = s_self.sub_(top).exp_()
    denom = e_trunk.sum(-1, keepdim=True) + e_self.sum(-1, keepdim=True)
    out = torch.einsum("chist,chtd->chisd", e_trunk.to(v.dtype), v_trunk)
    out = out + torch.matmul(e_self.to(v.dtype), v)
    return (out / denom).to(v.dtype)


def _encode_groups(
    model: LongCLIP, trunks: torch.Tensor, groups: list[_Group], n_rows: int
) -> torch.Tensor:
    """Run trunks (C, T) once and every group's suffixes against them; (n_rows, D) out."""
    table = model.text_positional_table()
    x_trunk = model.token_embedding(trunks).to(model.dtype)
    x_trunk = x_trunk + table[: trunks.shape[1]].to(x_trunk.dtype)
    xs = []
    for g in groups:
        x = model.token_embedding(g.tokens).to(model.dtype)
        xs.append(x + table[g.positions].to(x.dtype))
    c, t_len, width = x_trunk.shape
    blocks = list(model.transformer.resblocks)
    for layer, block in enumerate(blocks):
        heads = block.heads
        d = width // heads
        qkv = block.qkv(x_trunk)
        q_t, k_t, v_t = qkv.view(c, t_len, 3, heads, d).permute(2, 0, 3, 1, 4)
        if layer < len(blocks) - 1:
            trunk_out = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True)
        new_xs = []
        for g, x in zip(groups, xs, strict=True):
            _, items, s_len = g.tokens.shape
            qkv = block.qkv(x)
            # (C, I, S, 3, H, d) -> 3 x (C, H, I, S, d)
            q, k, v = qkv.view(c, items, s_len, 3, heads, d).permute(3, 0, 4, 1, 2, 5)
            out = _suffix_attention(q, k, v, k_t, v_t, g.prefix)
            out = out.permute(0, 2, 3, 1, 4).reshape(c, items, s_len, width)
            new_xs.append(block.mlp_residual(block.attention_residual(out, x)))
        xs = new_xs
        if layer == len(blocks) - 1:
            break  # the trunk's own output is never pooled: only its keys/values are used
        trunk_out = trunk_out.transpose(1, 2).reshape(c, t_len, width)
        x_trunk = block.mlp_residual(block.attention_residual(trunk_out, x_trunk))
    out = torch.empty(n_rows, model.config.embed_dim, dtype=model.dtype, device=trunks.device)
    for g, x in zip(groups, xs, strict=True):
        if not g.targets:
            continue
        ci = torch.tensor([(t[0], t[1]) for t in g.targets], device=trunks.device)
        rows = torch.tensor([t[2] for t in g.targets], device=trunks.device)
        pooled = x[ci[:, 0], ci[:, 1], g.pool[ci[:, 0], ci[:, 1]]]
        out[rows] = model.ln_final(pooled) @ model.text_projection
    return out


def encode_plain(model: LongCLIP, sequences: Sequence[Sequence[int]], batch: int = 64):
    """Embeddings (N, D) of unpadded token sequences through ``model.encode_text``."""
    device = model.token_embedding.weight.device
    out = torch.empty(len(sequences), model.config.embed_dim, dtype=model.dtype, device=device)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        longest = max(len(sequences[i]) for i in rows)
        tokens = torch.zeros(len(rows), longest, dtype=torch.long)
        for r, i in enumerate(rows):
            tokens[r, : len(sequences[i])] = torch.tensor(sequences[i])
        out[torch.tensor(rows, device=device)] = model.encode_text(tokens.to(device))
    return out


def encode_chains(
    model: LongCLIP,
    chains: Sequence[Sequence[Sequence[int]]],
    max_suffix: int = DEFAULT_MAX_SUFFIX,
) -> list[torch.Tensor]:
    """Text embeddings of chains of token sequences, sharing each chain's prefixes.

    Args:
        model: the text tower to use (its ``encode_text`` is the plain equivalent).
        chains: per chain, unpadded token sequences ``[SOT, ..., EOT]`` (as the model would
            see them after tokenisation and truncation).
        max_suffix: captions whose part after the prefix shared with the chain's longest
            sequence is longer than this are encoded plainly.

    Returns:
        Per chain, a tensor (len(chain), D) equal to ``model.encode_text`` of each
        sequence up to float rounding.
    """
    device = model.token_embedding.weight.device
    offsets = np.cumsum([0] + [len(ch) for ch in chains])
    n_rows = int(offsets[-1])
    trunks: list[list[int]] = []
    # Per item: (chain, output row, prefix length, suffix tokens, pooled index in suffix)
    shared: list[tuple[int, int, int, list[int], int]] = []
    plain: list[tuple[int, list[int]]] = []
    for ci, chain in enumerate(chains):
        longest = max(chain, key=len) if chain else []
        trunk = list(longest[:-1])
        trunks.append(trunk)
        for j, seq in enumerate(chain):
            seq = list(seq)
            row = int(offsets[ci]) + j
            pool = int(np.argmax(seq))
            prefix = min(_common_prefix(seq, trunk), pool)
            if len(seq) - prefix > max_suffix or prefix == 0:
                plain.append((row, seq))
            else:
                shared.append((ci, row, prefix, seq[prefix:], pool - prefix))
    out = torch.empty(n_rows, model.config.embed_dim, dtype=model.dtype, device=device)
    if plain:
        out[torch.tensor([r for r, _ in plain], device=device)] = encode_plain(
            model, [s for _, s in plain]
        )
    if shared:
        t_len = max(len(t) for t in trunks)
        trunk_ids = torch.zeros(len(chains), t_len, dtype=torch.long)
        for ci, trunk in enumerate(trunks):
            trunk_ids[ci, : len(trunk)] = torch.tensor(trunk, dtype=torch.long)
        # Bucket suffixes: the EOT-only suffixes of c_k apart from longer ones, to limit padding.
        short = [it for it in shared if len(it[3]) == 1]
        buckets = [short, [it for it in shared if len(it[3]) > 1]]
        groups = [
            _make_group(b, len(chains), model.context_length).to(device) for b in buckets if b
        ]
        out_shared = _encode_groups(model, trunk_ids.to(device), groups, n_rows)
        rows = torch.tensor([it[1] for it in shared], device=device)
        out[rows] = out_shared[rows]
    return [out[offsets[i] : offsets[i + 1]] for i in range(len(chains))]


# --------------------------------------------------------------------------------------
# Running the benchmark
# --------------------------------------------------------------------------------------


def embed_row_images(
    scorer: Scorer, rows: Sequence[SdciRow], batch_size: int = 64
) -> torch.Tensor:
    """Raw image embeddings (N, D) of the rows' images."""
    return scorer.embed_images([load_image_source(r.image) for r in rows], batch_size=batch_size)


def _token_lists(scorer: Scorer, texts: Sequence[str]) -> list[list[int]]:
    """The scorer's token ids (truncation policy applied), cut after each row's EOT."""
    ids = scorer.tokenize(list(texts))
    ends = (ids.argmax(dim=1) + 1).tolist()
    return [row[:end] for row, end in zip(ids.tolist(), ends, strict=True)]


def embed_chain_texts(
    scorer: Scorer,
    rows: Sequence[SdciRow],
    prefix_reuse: bool = True,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
) -> list[torch.Tensor]:
    """Raw fp32 CPU embeddings of each row's ``captions + neg_captions``.

    With ``prefix_reuse`` the rows are encoded by :func:`encode_chains`, otherwise every
    caption goes through ``model.encode_text`` on its own.
    """
    chains = [_token_lists(scorer, r.captions + r.neg_captions) for r in rows]
    with torch.inference_mode(), scorer.forward_context():
        if prefix_reuse:
            out = encode_chains(scorer.model, chains, max_suffix)
        else:
            flat = encode_plain(scorer.model, [s for ch in chains for s in ch])
            sizes = [len(ch) for ch in chains]
            out = list(torch.split(flat, sizes))
    return [o.float().cpu() for o in out]


@dataclass
class ChainScores:
    """Cosines of one image with its captions and negatives."""

    captions: list[float]
    negatives: list[float]


def score_rows(
    scorer: Scorer,
    rows: Sequence[SdciRow],
    image_embeddings: torch.Tensor,
    prefix_reuse: bool = True,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
) -> list[ChainScores]:
    """Cosine of each row's image embedding with its captions and negatives."""
    texts = embed_chain_texts(scorer, rows, prefix_reuse, max_suffix)
    out = []
    for row, img, emb in zip(rows, image_embeddings, texts, strict=True):
        cos = cosine_similarity(img.expand(len(emb), -1), emb)
        n = len(row.captions)
        out.append(ChainScores(cos[:n].tolist(), cos[n:].tolist()))
    return out


@dataclass
class Timing:
    """Prefix reuse against plain encoding on the same chains."""

    chains: int
    captions: int
    prefix_seconds: float
    plain_seconds: float
    max_abs_diff: float  # largest |cosine difference| between the two encodings

    @property
    def speedup(self) -> float:
        return self.plain_seconds / max(self.prefix_seconds, 1e-12)


def time_prefix_reuse(
    scorer: Scorer,
    rows: Sequence[SdciRow],
    image_embeddings: torch.Tensor,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
) -> Timing:
    """Encode ``rows`` both ways (after a warm-up) and compare time and cosines."""
    score_rows(scorer, rows[:1], image_embeddings[:1], True, max_suffix)  # warm-up
    start = time.perf_counter()
    shared = score_rows(scorer, rows, image_embeddings, True, max_suffix)
    middle = time.perf_counter()
    plain = score_rows(scorer, rows, image_embeddings, False, max_suffix)
    end = time.perf_counter()
    diff = max(
        (
            float(np.max(np.abs(np.subtract(a.captions + a.negatives, b.captions + b.negatives))))
            for a, b in zip(shared, plain, strict=True)
        ),
        default=0.0,
    )
    return Timing(
        chains=len(rows),
        captions=sum(len(r.captions) + len(r.neg_captions) for r in rows),
        prefix_seconds=middle - start,
        plain_seconds=end - middle,
        max_abs_diff=diff,
    )


def run_intrinsic(
    scorer: Scorer,
    rows: Sequence[SdciRow],
    *,
    prefix_reuse: bool = True,
    chains_per_batch: int = 16,
    image_batch_size: int = 64,
    max_suffix: int = DEFAULT_MAX_SUFFIX,
    on_progress: Callable[[int, list[ChainScores]], None] | None = None,
) -> tuple[IntrinsicResult, list[ChainScores]]:
    """Score every row and compute the positive, negative and average rates.

    Args:
        scorer: the model to evaluate.
        rows: the data (see :func:`~specs_metric.bench.sdci.read_sdci`).
        prefix_reuse: share cumulative prefixes (exact; faster).
        chains_per_batch: rows encoded together.
        image_batch_size: images per image batch.
        max_suffix: see :func:`encode_chains`.
        on_progress: called after each batch with the number of rows done and the scores
            so far (for writing partial results).

    Returns:
        The rates and the per-row cosines.
    """
    if chains_per_batch < 1:
        raise ValueError(f"chains_per_batch must be >= 1, got {chains_per_batch}")
    scores: list[ChainScores] = []
    for start in range(0, len(rows), chains_per_batch):
        batch = rows[start : start + chains_per_batch]
        images = embed_row_images(scorer, batch, image_batch_size)
        scores += score_rows(scorer, batch, images, prefix_reuse, max_suffix)
        if on_progress is not None:
            on_progress(len(scores), scores)
    result = intrinsic_rates([s.captions for s in scores], [s.negatives for s in scores])
    return result, scores
