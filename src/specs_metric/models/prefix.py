"""Encoding many token sequences through the text tower: length-sorted batches cut to their
longest row, and chains that share prefixes.

Attention is causal and pooling is at the EOT token, so padding after a sequence's EOT never
changes its embedding: :func:`length_batches` sorts sequences by length and cuts batches
within a token budget, and :func:`encode_plain` pads each batch only to its longest row.

Sequences that share a prefix (cumulative captions, the prefixes of one caption) share the
hidden states of that prefix. :func:`encode_chains` runs the longest sequence of a chain
once, keeps each layer's keys and values, and then computes only the tokens after the shared
prefix of every other sequence against those cached keys and values. A chain then costs
about as much as its longest sequence instead of the sum of all of them. Sequences whose
tokens do not extend the chain's longest one far enough are encoded plainly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from specs_metric.models.model import LongCLIP

# Sequences whose part after the shared prefix is longer than this are encoded plainly.
DEFAULT_MAX_SUFFIX = 48


def length_batches(lengths: Sequence[int], token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Group row indices into batches of similar length within a token budget.

    Rows are sorted by length (stable), then cut so that ``rows x longest <= token_budget``
    (at least one row per batch) and ``rows <= max_rows``.

    Example:
        >>> [b.tolist() for b in length_batches([5, 3, 9, 4], token_budget=10, max_rows=8)]
        [[1, 3], [0], [2]]
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        rows = end - start
        if rows > 1 and (rows * longest > token_budget or rows > max_rows):
            batches.append(order[start : end - 1])
            start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches


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
    """Embeddings (N, D) of unpadded token sequences through ``model.encode_text``, in
    length-sorted batches of ``batch`` rows, each padded to its longest row."""
    device = model.token_embedding.weight.device
    out = torch.empty(len(sequences), model.config.embed_dim, dtype=model.dtype, device=device)
    lengths = [len(s) for s in sequences]
    budget = batch * max(lengths, default=1)  # never binding: batches of ``batch`` rows
    for rows in length_batches(lengths, token_budget=budget, max_rows=batch):
        tokens = torch.zeros(len(rows), int(max(lengths[i] for i in rows)), dtype=torch.long)
        for r, i in enumerate(rows):
            tokens[r, : lengths[i]] = torch.tensor(sequences[i])
        out[torch.from_numpy(rows).to(device)] = model.encode_text(tokens.to(device))
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
