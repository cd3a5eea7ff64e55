"""Random HF ``transformers`` CLIP models for the format tests (needs ``transformers``)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 49408


def random_clip(
    *,
    positions: int = 77,
    act: str = "quick_gelu",
    head_width: int = 64,
    vision_width: int = 128,
    text_width: int = 128,
    layers: int = 1,
    mlp_ratio: float = 4.0,
    eps: float = 1e-5,
    embed_dim: int = 48,
    image_size: int = 32,
    patch: int = 16,
    seed: int = 0,
):
    """A random ``CLIPModel`` with LayerNorms and biases perturbed away from their init."""
    from transformers import CLIPConfig, CLIPModel

    common = {"hidden_act": act, "layer_norm_eps": eps, "num_hidden_layers": layers}
    config = CLIPConfig(
        text_config={
            **common,
            "hidden_size": text_width,
            "intermediate_size": int(text_width * mlp_ratio),
            "num_attention_heads": text_width // head_width,
            "max_position_embeddings": positions,
            "vocab_size": VOCAB,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "projection_dim": embed_dim,
        },
        vision_config={
            **common,
            "hidden_size": vision_width,
            "intermediate_size": int(vision_width * mlp_ratio),
            "num_attention_heads": vision_width // head_width,
            "image_size": image_size,
            "patch_size": patch,
            "projection_dim": embed_dim,
        },
        projection_dim=embed_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def save_random_clip(folder: Path, **kwargs) -> Path:
    """``save_pretrained`` a :func:`random_clip` into ``folder``; returns ``folder``."""
    random_clip(**kwargs).save_pretrained(folder)
    return folder


def hf_features(model, ids: torch.Tensor, pixels: torch.Tensor):
    """``get_text_features`` / ``get_image_features`` as tensors (transformers 4 and 5)."""

    def tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        return tensor(model.get_text_features(input_ids=ids)), tensor(
            model.get_image_features(pixel_values=pixels)
        )
