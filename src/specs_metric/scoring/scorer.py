"""The :class:`Scorer`: a loaded model plus its tokenizer and preprocessing.

Text batches are sorted by token length and cut to their longest sequence: attention is
causal and pooling happens at the EOT token, so padding after it never changes the result
(:mod:`specs_metric.models.model`). Images are preprocessed exactly as the reference does.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from specs_metric.data.images import ImageSource
from specs_metric.errors import UsageError
from specs_metric.models import fused
from specs_metric.models.factory import model_from_checkpoint
from specs_metric.models.model import LongCLIP, cast_matmul_weights
from specs_metric.models.prefix import length_batches
from specs_metric.models.weights.loading import read_checkpoint
from specs_metric.processing.preprocess import PreprocessConfig
from specs_metric.processing.tokenizer import (
    EOT_ID,
    LONG_CAPTION_POLICIES,
    Tokenizer,
    default_tokenizer,
    pad_ids,
)
from specs_metric.processing.transform import load_and_preprocess
from specs_metric.runtime.numerics import strict_fp32
from specs_metric.runtime.policy import DEFAULT_TOKEN_BUDGET, device_policy, resolve_device
from specs_metric.runtime.policy import INFERENCE_PRECISIONS as PRECISIONS
from specs_metric.scoring.image_embeddings import ImageEncoder
from specs_metric.scoring.scales import apply_scale, check_scale, cosine_matrix, cosine_similarity

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _pooled_length(ids: Sequence[int]) -> int:
    """Positions up to and including the first EOT (all of them if there is none)."""
    try:
        return list(ids).index(EOT_ID) + 1
    except ValueError:
        return len(ids)


class Scorer:
    """Scores captions against images with a LongCLIP/CLIP model.

    Create one with :func:`load`. Embeddings are raw (like the reference ``encode_*``);
    scores use the cosine of the two embeddings.

    Args:
        model: the model (eval mode).
        name: name or path the model was loaded from.
        checkpoint_sha256: sha256 of the checkpoint file (``None`` if built in memory).
        device: where the model runs.
        precision: ``fp32`` (exact, default), ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA; the
            reference's GPU numerics): Conv/Linear/projection weights and activations in
            half precision, LayerNorm in fp32. bf16 on a CPU replaces the model's residual
            blocks by fused oneDNN kernels (:mod:`specs_metric.models.fused`): the Scorer owns
            ``model`` from then on. On a CPU without bf16 matrix units (AMX or
            AVX-512-BF16) ``bf16`` falls back to ``fp32`` with a warning (``precision``
            then reads ``fp32``): emulated bf16 is several times slower than fp32.
        long_captions: ``truncate`` (default) or ``error`` for captions over the context.
        reference_rounding: whether the weights were rounded like the reference loader
            (recorded for cache keys and summaries).
        tokenizer: a tokenizer (default: the shared CLIP BPE tokenizer).
        preprocessing: the image pipeline (default: the reference one at the model's
            resolution).
    """

    def __init__(
        self,
        model: LongCLIP,
        *,
        name: str = "model",
        checkpoint_sha256: str | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        long_captions: str = "truncate",
        reference_rounding: bool = True,
        tokenizer: Tokenizer | None = None,
        preprocessing: PreprocessConfig | None = None,
    ) -> None:
        if long_captions not in LONG_CAPTION_POLICIES:
            raise UsageError(
                f"long_captions must be one of {LONG_CAPTION_POLICIES}, got {long_captions!r}"
            )
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise UsageError("precision='fp16' needs a CUDA device; use 'bf16' on CPU")
        if precision == "bf16" and self.device.type == "cpu" and not fused.native_bf16():
            warnings.warn(
                "precision='bf16': this CPU has no bf16 matrix units (AMX or AVX-512-BF16), "
                "where bf16 is slower than fp32; computing in fp32 (exact mode) instead",
                stacklevel=2,
            )
            precision = "fp32"
        self.model = model.to(self.device).eval()
        self._pin_memory = device_policy(self.device).pin_memory  # once: to_device is hot
        if precision == "bf16" and self.device.type == "cpu" and fused.available():
            fused.fuse_blocks(self.model)
        if precision != "fp32":
            # Fast modes keep half-precision matmul weights (LayerNorm stays fp32); this
            # beats autocast, which re-casts every weight on every call.
            cast_matmul_weights(self.model, HALF_DTYPES[precision])
        self.name = name
        self.checkpoint_sha256 = checkpoint_sha256
        self.precision = precision
        self.long_captions = long_captions
        self.reference_rounding = reference_rounding
        self.tokenizer = tokenizer or default_tokenizer()
        self.preprocessing = preprocessing or PreprocessConfig.reference(
            model.config.image_resolution
        )

    # --- properties -------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def numerics(self) -> str:
        """What decides the rounding of embeddings beyond the weights: the precision, and for
        half precision the device type and kernels (part of the image-embedding cache key)."""
        if self.precision == "fp32":
            return "fp32"
        first_block = self.model.transformer.resblocks[0]
        kernels = "/fused" if isinstance(first_block, fused.FusedBlock) else ""
        return f"{self.precision}/{self.device.type}{kernels}"

    @property
    def pipeline_fingerprint(self) -> str:
        """What decides image embeddings besides the weights and numerics: the preprocessing
        and, when not the OpenAI convention, the architecture's activation, head widths and
        LayerNorm epsilon (part of cache keys and of a job's resume identity). For the
        reference pipeline and convention this is the bare resolution, as it always was."""
        out = self.preprocessing.fingerprint()
        config = self.model.config
        described = (
            config.activation,
            config.vision_head_width,
            config.text_head_width,
            config.vision_layer_norm_eps,
            config.text_layer_norm_eps,
        )
        if described != ("quick_gelu", 64, 64, 1e-5, 1e-5):
            out += "|" + ",".join(map(str, described))
        return out

    @property
    def resolution(self) -> int:
        return self.model.config.image_resolution

    @property
    def embed_dim(self) -> int:
        return self.model.config.embed_dim

    def summary_fields(self) -> dict:
        """What identifies this model in every summary and results file."""
        from specs_metric import __version__

        return {
            "model": self.name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "version": __version__,
            "precision": self.precision,
            "reference_rounding": self.reference_rounding,
            "long_captions": self.long_captions,
            "device": str(self.device),
        }

    # --- preprocessing ----------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Reference token ids (N, context_length), zero padded."""
        return self.tokenizer(texts, self.context_length, self.long_captions)

    def preprocess(self, image: ImageSource) -> torch.Tensor:
        """The model's preprocessing -> FloatTensor (3, R, R). Accepts PIL, path or bytes."""
        return load_and_preprocess(image, self.preprocessing)

    # --- encoders ---------------------------------------------------------------------
    def forward_context(self) -> contextlib.AbstractContextManager:
        """The context of every forward pass: exact mode on CUDA computes in full fp32
        (PyTorch runs fp32 convolutions in TF32 by default)."""
        if self.precision == "fp32" and self.device.type == "cuda":
            return strict_fp32()
        return contextlib.nullcontext()

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the model's device. Where the device policy pins memory (CUDA)
        the tensor is copied into pinned memory once and sent asynchronously, so the copy
        overlaps with kernels already queued; on a CPU it is returned as it is."""
        if host.device == self.device:
            return host
        if self._pin_memory and host.device.type == "cpu":
            if not host.is_pinned():
                host = host.contiguous().pin_memory()
            return host.to(self.device, non_blocking=True)
        return host.to(self.device)

    @torch.inference_mode()
    def encode_pixels_on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings (fp32) of a preprocessed batch (N, 3, R, R), left on the device
        (no synchronisation: the caller copies them back when it needs them)."""
        with self.forward_context():
            return self.model.encode_image(self.to_device(pixels)).float()

    @torch.inference_mode()
    def encode_tokens_on_device(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings (fp32) of token ids, cut to the longest row first, left on the
        device."""
        # The EOT (largest id) ends each row; id 0 is a real token ("!"), so count to it.
        longest = int(tokens.argmax(dim=1).max()) + 1 if len(tokens) else 1
        tokens = tokens[:, :longest]
        with self.forward_context():
            return self.model.encode_text(self.to_device(tokens)).float()

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings (fp32, on CPU) of a preprocessed batch (N, 3, R, R)."""
        return self.encode_pixels_on_device(pixels).cpu()

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings (fp32, on CPU) of token ids, cut to the longest row first."""
        return self.encode_tokens_on_device(tokens).cpu()

    def embed_images(self, images: Sequence[ImageSource], batch_size: int = 64) -> torch.Tensor:
        """Raw image embeddings (N, D). ``images``: paths, encoded bytes or PIL images.

        Each distinct image (by content, see :mod:`specs_metric.scoring.image_embeddings`) is
        encoded once, in batches of ``batch_size`` distinct images.

        Raises:
            ImageError: for the first image that cannot be decoded (naming it).
        """
        result = ImageEncoder(self, batch_size, capacity=max(1, len(images))).embed(images)
        result.raise_first_error()
        return result.embeddings

    def embed_token_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        max_rows: int = 256,
    ) -> torch.Tensor:
        """Raw text embeddings (N, D) of id lists that fit the context (``[SOT] ... [EOT]``),
        in length-sorted batches of at most ``token_budget`` tokens and ``max_rows`` rows,
        each padded only to its longest row. A row's length runs to its first EOT, where
        the model pools (a literal ``<|endoftext|>`` in a caption ends it there)."""
        lengths = [_pooled_length(ids) for ids in token_ids]
        out = torch.empty(len(token_ids), self.embed_dim)
        batches = length_batches(lengths, token_budget, max_rows)
        if not batches:
            return out
        # The batches' embeddings stay on the device and come back in one copy: one
        # synchronisation per call instead of one per batch (on a CPU they are the same).
        parts = []
        for rows in batches:
            batch = pad_ids([token_ids[i][: lengths[i]] for i in rows])
            parts.append(self.encode_tokens_on_device(batch))
        out[torch.from_numpy(np.concatenate(batches))] = torch.cat(parts).cpu()
        return out

    def embed_texts(
        self, texts: Sequence[str], token_budget: int = DEFAULT_TOKEN_BUDGET
    ) -> torch.Tensor:
        """Raw text embeddings (N, D), computed in length-sorted, padding-trimmed batches."""
        if isinstance(texts, str):
            texts = [texts]
        ids, _ = self.tokenizer.fit(list(texts), self.context_length, self.long_captions)
        return self.embed_token_ids(ids, token_budget)

    # --- scores -----------------------------------------------------------------------
    def score(
        self, images: Sequence[ImageSource], captions: Sequence[str], scale: str = "specs"
    ) -> np.ndarray:
        """Scores of 1:1 pairs ``(images[i], captions[i])`` -> float64 array (N,)."""
        check_scale(scale)
        if len(images) != len(captions):
            raise UsageError(f"{len(images)} images but {len(captions)} captions")
        image_emb = self.embed_images(images)
        text_emb = self.embed_texts(captions)
        return apply_scale(cosine_similarity(image_emb, text_emb), scale)

    def score_matrix(
        self, images: Sequence[ImageSource], captions: Sequence[str], scale: str = "specs"
    ) -> np.ndarray:
        """Scores of every image against every caption -> (N_images, N_captions)."""
        check_scale(scale)
        image_emb = self.embed_images(images)
        return apply_scale(cosine_matrix(image_emb, self.embed_texts(captions)), scale)

    def explain(
        self,
        images: Sequence[ImageSource],
        captions: Sequence[str],
        segmenter="sentence",
        attribution: str = "prefix",
        scale: str = "specs",
    ) -> list:
        """Per-segment scores and deltas of 1:1 pairs: see
        :func:`specs_metric.scoring.explain.explain`.

        Returns one :class:`~specs_metric.scoring.explain.Explanation` per pair.
        """
        from specs_metric.scoring.explain import explain

        return explain(self, images, captions, segmenter, attribution, scale)


def load(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    precision: str = "fp32",
    *,
    reference_rounding: bool = True,
    long_captions: str = "truncate",
    arch: str | os.PathLike[str] | None = None,
    preprocess: str | os.PathLike[str] = "auto",
) -> Scorer:
    """Load a named model (``specs models``), a checkpoint file or an HF folder as a
    :class:`Scorer`.

    Args:
        name_or_path: e.g. ``"specs-b32"``, ``"path/to/spec.pt"``, a ``save_pretrained``
            folder or ``"hf:openai/clip-vit-base-patch32"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        precision: ``"fp32"`` (exact), ``"bf16"`` or ``"fp16"`` (CUDA).
        reference_rounding: round weights to fp16 as the reference loader does, so
            scores equal published ones (default). ``False`` keeps the file's precision
            (embeddings then differ by about 1e-3).
        long_captions: ``"truncate"`` or ``"error"``.
        arch: architecture name or JSON file for an OpenAI-layout file whose activation or
            head width is not the OpenAI convention (see ``specs models --archs``).
        preprocess: ``"auto"`` (the model's own), ``"reference"`` or a
            ``preprocessor_config.json``.
    """
    checkpoint = read_checkpoint(name_or_path, arch=arch, preprocess=preprocess)
    return Scorer(
        model_from_checkpoint(checkpoint, reference_rounding=reference_rounding),
        name=checkpoint.name,
        checkpoint_sha256=checkpoint.sha256,
        device=device,
        precision=precision,
        long_captions=long_captions,
        reference_rounding=reference_rounding,
        preprocessing=checkpoint.preprocess,
    )
