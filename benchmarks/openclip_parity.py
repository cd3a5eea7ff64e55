"""Parity with open_clip itself: embeddings of open_clip models read through specs_metric.

Not part of CI: open_clip needs torchvision. Install it without dependencies next to the
CPU torch (``pip install open_clip_torch --no-deps torch==2.13.0``). When torchvision is
missing this script registers empty stand-in modules for the names open_clip imports at
start-up (its image transforms and a ResNet batch-norm layer) and hides ``transformers``
from it (open_clip's optional HF text towers); the CLIP forward used here calls none of
them, and the script says so in its output.

For each case a random open_clip ``CLIP`` (LayerNorms and biases perturbed) is saved as
``open_clip_pytorch_model.bin`` with its ``open_clip_config.json``, read back by
:func:`specs_metric.models.weights.loading.read_checkpoint` (the sidecar gives activation
and head widths),
and both models embed the same token ids and pixels. The same file read without its
architecture (as the OpenAI convention) shows the error a silent misread would give.

    python benchmarks/openclip_parity.py --json benchmarks/results-openclip-parity.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import torch


def _stub_torchvision() -> bool:
    """Register import-only stand-ins for torchvision; returns whether it was needed."""
    if importlib.util.find_spec("torchvision") is not None:
        return False

    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision is not installed (import stand-in only)")

    names = ["Normalize", "Compose", "RandomResizedCrop", "InterpolationMode", "ToTensor",
             "Resize", "CenterCrop", "ColorJitter", "Grayscale"]
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    for name in names:
        setattr(transforms, name, _Unavailable)
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = _Unavailable
    tv.transforms, transforms.functional, tv.ops, ops.misc = transforms, functional, ops, misc
    sys.modules.update({
        "torchvision": tv, "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional, "torchvision.ops": ops,
        "torchvision.ops.misc": misc,
    })
    return True


# name: (quick_gelu, vision width, vision head width, mlp ratio, text width, text heads,
#        layers, embed dim, image size, patch, context)
CASES = {
    "tiny GELU, 64-wide heads (ViT-B-32 LAION style)":
        (False, 128, 64, 4.0, 128, 2, 2, 64, 32, 16, 77),
    "tiny QuickGELU, 64-wide heads (OpenAI style)":
        (True, 128, 64, 4.0, 128, 2, 2, 64, 32, 16, 77),
    "tiny GELU, 80-wide vision heads (ViT-H-14 style)":
        (False, 160, 80, 4.0, 128, 2, 2, 64, 32, 16, 77),
    "tiny GELU, 32-wide heads":
        (False, 96, 32, 4.0, 64, 2, 2, 48, 32, 16, 77),
    "tiny GELU, 88-wide heads, mlp 4.3637 (ViT-g-14 style)":
        (False, 176, 88, 4.3637, 128, 2, 1, 64, 28, 14, 77),
    "ViT-B-32 full size, GELU":
        (False, 768, 64, 4.0, 512, 8, 12, 512, 224, 32, 77),
}  # fmt: skip


def _model_cfg(case) -> dict:
    quick, vw, vhw, ratio, tw, heads, layers, embed, size, patch, ctx = case
    return {
        "embed_dim": embed,
        "quick_gelu": quick,
        "vision_cfg": {"image_size": size, "layers": layers, "width": vw, "head_width": vhw,
                       "mlp_ratio": ratio, "patch_size": patch},
        "text_cfg": {"context_length": ctx, "vocab_size": 49408, "width": tw, "heads": heads,
                     "layers": layers},
    }  # fmt: skip


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def run_case(open_clip, name: str, case, folder: Path) -> dict:
    from specs_metric.models.factory import model_from_checkpoint
    from specs_metric.models.weights.loading import read_checkpoint
    from specs_metric.processing.tokenizer import default_tokenizer

    cfg = _model_cfg(case)
    torch.manual_seed(0)
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                           quick_gelu=cfg["quick_gelu"]).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.startswith(("ln_", "visual.ln_")) or ".ln_" in key:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            elif key.endswith("bias"):
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    size = cfg["vision_cfg"]["image_size"]
    ids = default_tokenizer()(["a photo of a cat", "two dogs and a red ball on the grass"], 77)
    pixels = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        ref_text = model.encode_text(ids)
        ref_image = model.encode_image(pixels)
        ours = model_from_checkpoint(
            read_checkpoint(folder / "open_clip_pytorch_model.bin"), reference_rounding=False
        )
        result = {
            "case": name,
            "activation": ours.config.activation,
            "vision_head_width": ours.config.vision_head_width,
            "text_rel_err": _relative(ours.encode_text(ids), ref_text),
            "image_rel_err": _relative(ours.encode_image(pixels), ref_image),
        }
        # the same weights read with the OpenAI convention (a renamed file, no --arch)
        plain = folder / "renamed.pt"
        torch.save(model.state_dict(), plain)
        try:
            misread = model_from_checkpoint(read_checkpoint(plain), reference_rounding=False)
            result["misread_text_rel_err"] = _relative(misread.encode_text(ids), ref_text)
            result["misread_image_rel_err"] = _relative(misread.encode_image(pixels), ref_image)
        except ValueError as exc:
            result["misread"] = f"refused: {str(exc)[:120]}"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    stubbed = _stub_torchvision()
    if stubbed:
        # open_clip's optional HF text towers import transformers, which probes for
        # torchvision; with the stand-ins that probe fails, so hide transformers meanwhile.
        hidden = sys.modules.get("transformers")
        sys.modules["transformers"] = None  # an ImportError, which open_clip handles
    import open_clip

    if stubbed:
        del sys.modules["transformers"]
        if hidden is not None:
            sys.modules["transformers"] = hidden

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, case) in enumerate(CASES.items()):
            res = run_case(open_clip, name, case, Path(tmp) / str(i))
            results.append(res)
            print(json.dumps(res))
    out = {
        "open_clip_version": getattr(open_clip, "__version__", "unknown"),
        "torch": torch.__version__,
        "torchvision": "import stand-ins (not installed)" if stubbed else "installed",
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    worst = max(max(r["text_rel_err"], r["image_rel_err"]) for r in results)
    print(f"worst relative error against open_clip: {worst:.2e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
