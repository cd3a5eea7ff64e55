"""Fused oneDNN kernels for bf16 inference on the CPU (the fast mode's transformer blocks).

In bf16 on a CPU with matrix units the matmuls are fast enough that a third of a block's
time goes elsewhere: the QuickGELU activation and the residual additions (each a full pass
over memory) and re-packing every weight into oneDNN's blocked layout on every call.
:func:`fuse_blocks` replaces each residual block by a :class:`FusedBlock` whose linear layers
use weights packed once, and which does that element-wise work in the matmul's epilogue, on
the fp32 accumulator before the result is rounded to bf16:

* ``c_fc`` + QuickGELU: oneDNN's ``swish`` post-op computes ``z * sigmoid(z)``. With
  ``c_fc``'s weight and bias multiplied by 1.702, ``z = 1.702 h`` and the output is
  ``1.702 * QuickGELU(h)``; ``c_proj``'s weight is divided by 1.702 to compensate (its
  bias is not). The identity is exact; only bf16 rounding of the scaled weights differs.
* ``out_proj`` and ``c_proj`` add the residual with the ``add`` binary post-op.

Exact (fp32) mode never uses this module: its numerics stay those of the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specs_metric.models.model import LongCLIP, ResidualAttentionBlock

QUICK_GELU_SCALE = 1.702


def native_bf16() -> bool:
    """True when the CPU has bf16 matrix units (AMX or AVX-512-BF16). Without them bf16
    matmuls are emulated and several times slower than fp32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def available() -> bool:
    """True when oneDNN's fused bf16 linear kernels exist in this build and run on this CPU
    (they need AVX-512 BW/VL/DQ or AVX-NE-CONVERT; AMX or AVX-512-BF16 make them fast)."""
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_linear_pointwise")
        and hasattr(mkldnn, "_is_mkldnn_bf16_supported")
        and bool(mkldnn._is_mkldnn_bf16_supported())
    )


class PackedLinear:
    """``x @ weight.T + bias`` with the weight packed once for oneDNN, and an optional
    fused epilogue (``"swish"``, or :meth:`add` for a residual)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype, post: str = "none"
    ) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), None)
        self.bias = bias.detach().to(dtype)
        self.post = post

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.weight, self.bias, self.post, [], ""
        )

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one kernel."""
        return torch.ops.mkldnn._linear_pointwise.binary(
            x.contiguous(), residual.contiguous(), self.weight, self.bias, "add"
        )


class FusedBlock(nn.Module):
    """A :class:`~specs_metric.models.model.ResidualAttentionBlock` for inference with fused
    kernels: same ``forward`` / ``forward_at`` contract, same LayerNorms (fp32 compute).
    CPU only: the packed weights are plain attributes, which ``.to(device)`` does not move.

    Args:
        block: the block to copy (its weights are read once, in their stored precision).
        dtype: compute dtype of the linear layers (``torch.bfloat16``).
        pooled: also pack the query and key/value halves of the input projection
            separately, for :meth:`forward_at` (only a tower's last block needs them).
    """

    def __init__(self, block: ResidualAttentionBlock, dtype: torch.dtype, pooled: bool) -> None:
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.heads = attn.heads
        self.width = width = attn.out_proj.in_features
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        w, b = attn.in_proj_weight.float(), attn.in_proj_bias.float()
        self.qkv_proj = PackedLinear(w, b, dtype)
        if pooled:
            self.q = PackedLinear(w[:width], b[:width], dtype)
            self.kv = PackedLinear(w[width:], b[width:], dtype)
        self.out = PackedLinear(attn.out_proj.weight, attn.out_proj.bias, dtype)
        scale = QUICK_GELU_SCALE
        self.fc = PackedLinear(
            mlp.c_fc.weight.float() * scale, mlp.c_fc.bias.float() * scale, dtype, "swish"
        )
        self.proj = PackedLinear(mlp.c_proj.weight.float() / scale, mlp.c_proj.bias, dtype)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values (..., 3W) of ``ln_1(x)``."""
        return self.qkv_proj(self.ln_1(x))

    def attention_residual(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x + out_proj(out)`` for the heads' concatenated output ``out``."""
        return self.out.add(out, x)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + mlp(ln_2(x))``."""
        return self.proj.add(self.fc(self.ln_2(x)), x)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        n, length, width = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = self.attention_residual(out.transpose(1, 2).reshape(n, length, width), x)
        return self.mlp_residual(x)

    def forward_at(self, x: torch.Tensor, index: torch.Tensor, causal: bool) -> torch.Tensor:
        """The block's output (N, W) at position ``index[i]`` of each row i."""
        n, length, width = x.shape
        head_dim = width // self.heads
        rows = torch.arange(n, device=x.device)
        h = self.ln_1(x)
        q = self.q(h[rows, index].contiguous()).view(n, self.heads, 1, head_dim)
        k, v = self.kv(h).view(n, length, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        if causal:
            positions = torch.arange(length, device=x.device)
            mask = (positions[None, :] <= index[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.attention_residual(out.reshape(n, width), x[rows, index].contiguous())
        return self.mlp_residual(y)


def fuse_blocks(model: LongCLIP, dtype: torch.dtype = torch.bfloat16) -> LongCLIP:
    """Replace the residual blocks of both towers by :class:`FusedBlock` (in place).

    For inference on the CPU only; call before the matmul weights are cast, so the scaled
    weights are rounded once. Returns ``model``; a GELU model is left as it is (the fused
    MLP computes QuickGELU only).
    """
    if model.config.activation != "quick_gelu":
        return model
    for tower in (model.transformer, model.visual.transformer):
        last = len(tower.resblocks) - 1
        for i, block in enumerate(tower.resblocks):
            tower.resblocks[i] = FusedBlock(block, dtype, pooled=i == last)
    return model
