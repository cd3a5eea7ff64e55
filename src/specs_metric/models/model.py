"""The LongCLIP architecture (a ViT image tower and a causal text tower).

Parameter names reproduce the reference state-dict keys exactly, so a reference ``.pt`` file
loads with ``load_state_dict`` and a model saved here loads in the reference code. The
architecture is described by :class:`~specs_metric.models.config.ModelConfig` (activation, head
widths, LayerNorm epsilon and MLP widths included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The architecture lives in specs_metric.models.config; re-exported here where it always was.
from specs_metric.models.config import ModelConfig, config_from_state_dict  # noqa: F401

# LongCLIP keeps CLIP's first 20 positional rows and learns the rest separately.
KEPT_POSITIONS = 20


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as CLIP does).

    bf16 input on the CPU (the project's fast mode; the reference has none) goes to
    PyTorch's mixed-precision kernel, which also accumulates in fp32 with the fp32 weights
    but skips two full-tensor casts (about 10x faster); at most 1 bf16 ulp differs. CUDA has
    no such kernel for LayerNorm (bf16 input with fp32 weights raises there).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        out = F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        )
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``; without autograd, computed in place (same bits, one buffer
    instead of three: these element-wise passes are a large share of CPU time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return x * torch.sigmoid(1.702 * x)
        return x.mul(1.702).sigmoid_().mul_(x)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    Uses ``scaled_dot_product_attention`` on batch-first input; equal to the reference's
    ``nn.MultiheadAttention`` within float rounding.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = max(heads, 1)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))

    def forward_at(self, x: torch.Tensor, index: torch.Tensor, causal: bool) -> torch.Tensor:
        """Attention output (N, W) at one query position per row (keys: all positions, or
        those up to the query when causal)."""
        n, length, width = x.shape
        head_dim = width // self.heads
        w, b = self.in_proj_weight, self.in_proj_bias
        query = F.linear(x[torch.arange(n, device=x.device), index], w[:width], b[:width])
        kv = F.linear(x, w[width:], b[width:]).view(n, length, 2, self.heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)
        q = query.view(n, self.heads, 1, head_dim)
        mask = None
        if causal:
            positions = torch.arange(length, device=x.device)
            mask = (positions[None, :] <= index[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.reshape(n, width))


def activation_module(name: str) -> nn.Module:
    """``quick_gelu`` (OpenAI CLIP, LongCLIP) or ``gelu`` (exact erf GELU: open_clip's
    default, LAION models, HF ``hidden_act="gelu"``)."""
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class ResidualAttentionBlock(nn.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        mlp_width: int | None = None,
        activation: str = "quick_gelu",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width, eps=eps)
        mlp_width = mlp_width or 4 * width
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", activation_module(activation))
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))
        self.ln_2 = LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        if torch.is_grad_enabled():
            x = x + self.attn(self.ln_1(x), causal=causal)
            return x + self.mlp(self.ln_2(x))
        # Without autograd the residual sums reuse the new buffers (addition commutes).
        x = self.attn(self.ln_1(x), causal=causal).add_(x)
        return self.mlp(self.ln_2(x)).add_(x)

    # Pieces of ``forward`` for code that runs attention itself (prefix reuse in
    # bench.intrinsic); fused.FusedBlock provides the same ones.
    @property
    def heads(self) -> int:
        return self.attn.heads

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values (..., 3W) of ``ln_1(x)``."""
        return F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)

    def attention_residual(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x + out_proj(out)`` for the heads' concatenated output ``out``."""
        return x + self.attn.out_proj(out)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + mlp(ln_2(x))``."""
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: torch.Tensor, index: torch.Tensor, causal: bool) -> torch.Tensor:
        """The block's output (N, W) at position ``index[i]`` of each row i.

        Equal to ``forward(x)[arange(N), index]``, without computing the MLP and the
        attention output of the other positions (most of a block's cost).
        """
        rows = torch.arange(x.shape[0], device=x.device)
        y = x[rows, index] + self.attn.forward_at(self.ln_1(x), index, causal)
        return y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        causal: bool,
        mlp_width: int | None = None,
        activation: str = "quick_gelu",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.width = width
        self.causal = causal
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, activation, eps) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=self.causal)
        return x

    def forward_at(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Final states (N, W) at one position per row: what pooling reads. The last block
        only computes that position (all positions still provide keys and values)."""
        for block in self.resblocks[:-1]:
            x = block(x, causal=self.causal)
        return self.resblocks[-1].forward_at(x, index, self.causal)


class VisionTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width, patch = config.vision_width, config.vision_patch_size
        grid = config.image_resolution // patch
        self.input_resolution = config.image_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        eps = config.vision_layer_norm_eps
        self.ln_pre = LayerNorm(width, eps=eps)
        self.transformer = Transformer(
            width,
            config.vision_layers,
            config.vision_heads,
            False,
            config.vision_mlp_width,
            config.activation,
            eps,
        )
        self.ln_post = LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(torch.zeros(width, config.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        class_token = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = self.transformer.forward_at(self.ln_pre(x), class_token)
        return self.ln_post(x) @ self.proj


class LongCLIP(nn.Module):
    """LongCLIP (context 248) or CLIP (context 77) with a ViT image tower.

    Embeddings returned by :meth:`encode_image` / :meth:`encode_text` are raw (not
    normalised), like the reference ``encode_image`` / ``encode_text``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.transformer = Transformer(
            config.text_width,
            config.text_layers,
            config.text_heads,
            True,
            config.text_mlp_width,
            config.activation,
            config.text_layer_norm_eps,
        )
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(
            torch.zeros(config.context_length, config.text_width)
        )
        if config.is_long:
            self.positional_embedding_res = nn.Parameter(
                torch.zeros(config.context_length, config.text_width)
            )
        self.ln_final = LayerNorm(config.text_width, eps=config.text_layer_norm_eps)
        self.text_projection = nn.Parameter(torch.zeros(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> LongCLIP:
        """CLIP's random initialisation (for training from scratch and benchmarks).

        Normal weights with CLIP's standard deviations, zero biases, unit LayerNorms,
        ``logit_scale = log(1 / 0.07)``. Returns ``self``.
        """

        def normal(t: torch.Tensor, std: float) -> None:
            t.copy_(torch.randn(t.shape, generator=generator) * std)

        normal(self.token_embedding.weight, 0.02)
        for table in (self.positional_embedding, getattr(self, "positional_embedding_res", None)):
            if table is not None:
                normal(table, 0.01)
        for tower in (self.transformer, self.visual.transformer):
            width, layers = tower.width, len(tower.resblocks)
            for block in tower.resblocks:
                normal(block.attn.in_proj_weight, width**-0.5)
                normal(block.attn.out_proj.weight, width**-0.5 * (2 * layers) ** -0.5)
                normal(block.mlp.c_fc.weight, (2 * width) ** -0.5)
                normal(block.mlp.c_proj.weight, width**-0.5 * (2 * layers) ** -0.5)
                for bias in (
                    block.attn.in_proj_bias,
                    block.attn.out_proj.bias,
                    block.mlp.c_fc.bias,
                    block.mlp.c_proj.bias,
                ):
                    bias.zero_()
        vw = self.config.vision_width
        normal(self.visual.conv1.weight, (3 * self.config.vision_patch_size**2) ** -0.5)
        normal(self.visual.class_embedding, vw**-0.5)
        normal(self.visual.positional_embedding, vw**-0.5)
        normal(self.visual.proj, vw**-0.5)
        normal(self.text_projection, self.config.text_width**-0.5)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.logit_scale.fill_(math.log(1 / 0.07))
        return self

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def text_positional_table(self) -> torch.Tensor:
        """Positional rows of the text tower.

        Rows < 20 come from ``positional_embedding`` and the rest from
        ``positional_embedding_res``: one table, equal to the reference's masked sum.
        """
        if not self.config.is_long:
            return self.positional_embedding
        return torch.cat(
            [
                self.positional_embedding[:KEPT_POSITIONS],
                self.positional_embedding_res[KEPT_POSITIONS:],
            ]
        )

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings (N, embed_dim) from preprocessed pixels (N, 3, R, R)."""
        return self.visual(pixels)

    def text_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus positional embeddings (N, L, W): the text transformer's input."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        x = self.token_embedding(tokens).to(self.dtype)
        return x + self.text_positional_table()[:length].to(x.dtype)

    def text_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-layer, ``ln_final``-normalised text states (N, L, W) for tokens (N, L)."""
        return self.ln_final(self.transformer(self.text_input(tokens)))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings (N, embed_dim) pooled at each row's EOT (its largest id).

        Padding after the EOT may be trimmed: attention is causal, so positions after the
        EOT never affect it.
        """
        eot = tokens.argmax(dim=-1)
        pooled = self.transformer.forward_at(self.text_input(tokens), eot)
        return self.ln_final(pooled) @ self.text_projection

    def forward(
        self, pixels: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels), self.encode_text(tokens)


# Parameters the reference loader stores in fp16 (docs/models.md, "Exactness and reference
# quirks"):
# all Conv2d/Linear weights and biases, attention input projections, and the two output
# projections.
def is_fp16_rounded(key: str) -> bool:
    """True for the state-dict keys the reference loader rounds to fp16."""
    return (
        key.endswith(("attn.in_proj_weight", "attn.in_proj_bias"))
        or ".attn.out_proj." in key
        or ".mlp.c_fc." in key
        or ".mlp.c_proj." in key
        or key in ("visual.conv1.weight", "text_projection", "visual.proj")
    )


def cast_matmul_weights(model: LongCLIP, dtype: torch.dtype) -> LongCLIP:
    """Store the Conv/Linear/projection weights (exactly those of :func:`is_fp16_rounded`)
    in ``dtype``; activations then follow, while LayerNorms still compute in fp32.

    With ``torch.float16`` on CUDA this is the reference's GPU numerics.
    """
    for name, param in model.named_parameters():
        if is_fp16_rounded(name):
            param.data = param.data.to(dtype)
    return model
