"""The reference implementation's computation, rebuilt for the speed baseline.

Same weights as the project's model, but computed the way the reference code does it:
``nn.MultiheadAttention`` on (L, N, D) input with an additive -inf causal mask, every caption
padded to the full 248 positions, the two positional tables combined by masks on every call,
and every position of every block computed. Used only by ``benchmarks/speed.py``.
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, width: int, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.mask)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class ReferenceStyleCLIP(nn.Module):
    """Loads a project state dict; ``encode_image`` / ``encode_text`` as the reference.

    Every tensor is a parameter or buffer, so ``device`` (or ``.to``) places all of it.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu"):
        super().__init__()
        sd = state_dict
        vw = sd["visual.conv1.weight"].shape[0]
        tw = sd["ln_final.weight"].shape[0]
        ctx = sd["positional_embedding"].shape[0]
        n_vis = sum(1 for k in sd if k.startswith("visual.") and k.endswith("in_proj_weight"))
        n_txt = sum(1 for k in sd if k.startswith("transformer.") and k.endswith("in_proj_weight"))
        patch = sd["visual.conv1.weight"].shape[-1]
        self.conv1 = nn.Conv2d(3, vw, patch, patch, bias=False)
        self.visual_blocks = nn.Sequential(*[_Block(vw, None) for _ in range(n_vis)])
        mask = torch.full((ctx, ctx), float("-inf")).triu_(1)
        self.text_blocks = nn.Sequential(*[_Block(tw, mask) for _ in range(n_txt)])
        self.ln_pre, self.ln_post, self.ln_final = (
            nn.LayerNorm(vw),
            nn.LayerNorm(vw),
            nn.LayerNorm(tw),
        )
        self.token_embedding = nn.Embedding(*sd["token_embedding.weight"].shape)
        params = {}
        for key, value in sd.items():
            if key.startswith("visual.transformer.resblocks."):
                params["visual_blocks." + key[len("visual.transformer.resblocks.") :]] = value
            elif key.startswith("transformer.resblocks."):
                params["text_blocks." + key[len("transformer.resblocks.") :]] = value
            elif key.startswith("visual.") and key[7:].split(".")[0] in (
                "conv1",
                "ln_pre",
                "ln_post",
            ):
                params[key[7:]] = value
            elif key.startswith(("ln_final.", "token_embedding.")):
                params[key] = value
        self.load_state_dict(params)
        plain = {
            "class_embedding": sd["visual.class_embedding"],
            "visual_positions": sd["visual.positional_embedding"],
            "visual_proj": sd["visual.proj"],
            "pos": sd["positional_embedding"],
            "pos_res": sd["positional_embedding_res"],
            "text_projection": sd["text_projection"],
            "mask1": torch.zeros(ctx, 1).index_fill_(0, torch.arange(20), 1.0),
        }
        for name, value in plain.items():
            self.register_buffer(name, value.clone(), persistent=False)
        self.to(device).eval()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], device=x.device)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.visual_positions)
        x = self.visual_blocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.visual_proj

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens)
        x = x + self.pos * self.mask1 + self.pos_res * (1 - self.mask1)
        x = self.text_blocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


class ReferenceStyleTokenizer:
    """The reference tokenizer's per-caption work, as the host-cost baseline.

    Every caption goes through ftfy, double HTML unescaping, whitespace collapsing and
    lower-casing, then the pre-tokenisation pattern; each word is BPE-merged once and cached
    as a space-joined string, which is split and looked up on every use, as the reference's
    ``SimpleTokenizer.encode`` does. Ids equal those of
    :class:`specs_metric.processing.tokenizer.Tokenizer`.
    """

    def __init__(self) -> None:
        import html
        import re

        import ftfy

        from specs_metric.processing.tokenizer import _WORD_PATTERN, EOT_ID, SOT_ID, Tokenizer

        ours = Tokenizer()  # only for its vocabulary tables and merge function
        self._ours, self._pattern = ours, _WORD_PATTERN
        self._fix, self._unescape, self._space = ftfy.fix_text, html.unescape, re.compile(r"\s+")
        self._sot, self._eot = SOT_ID, EOT_ID
        self._cache: dict[str, str] = {}

    def _bpe(self, token: str) -> str:
        if token not in self._cache:
            self._cache[token] = self._ours._bpe(token)
        return self._cache[token]

    def token_ids(self, text: str) -> list[int]:
        text = self._unescape(self._unescape(self._fix(text)))
        text = self._space.sub(" ", text.strip()).strip().lower()
        ids = [self._sot]
        for piece in self._pattern.findall(text):
            mapped = "".join(self._ours._byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self._ours.encoder[t] for t in self._bpe(mapped).split(" "))
        ids.append(self._eot)
        return ids
