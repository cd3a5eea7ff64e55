"""How an image becomes the model's input: :class:`PreprocessConfig`, a description of the
pipeline as data (resize of the shorter side, centre crop with its offset rounding,
interpolation, mean and std). The reference pipeline rounds crop offsets; HF's
``CLIPImageProcessor`` floors them. :mod:`.transform` runs it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from specs_metric.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
CROP_ROUNDINGS = ("round", "floor")


@dataclass(frozen=True)
class PreprocessConfig:
    """Image preprocessing: resize the shorter side to ``resize``, centre crop ``crop``
    (offsets rounded with ``crop_rounding``), RGB, /255, minus ``mean``, divided by ``std``.

    The default is the reference pipeline (bicubic, ``round``, CLIP's mean/std).
    """

    resize: int
    crop: int = 0  # 0: same as resize
    interpolation: str = "bicubic"
    crop_rounding: str = "round"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if not self.crop:
            object.__setattr__(self, "crop", self.resize)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {INTERPOLATIONS}")
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ConfigError(f"crop_rounding must be one of {CROP_ROUNDINGS}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std need three values (std > 0)")
        if self.crop > self.resize or self.resize <= 0:
            raise ConfigError(f"crop {self.crop} must be positive and at most resize")

    @classmethod
    def reference(cls, resolution: int) -> PreprocessConfig:
        return cls(resize=resolution)

    def is_reference(self) -> bool:
        return self == PreprocessConfig.reference(self.crop)

    def fingerprint(self) -> str:
        """Part of image-cache keys: the bare resolution for the reference pipeline (so
        existing caches stay valid), else every field."""
        if self.is_reference():
            return str(self.crop)
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        try:
            return cls(**{k: tuple(v) if k in ("mean", "std") else v for k, v in data.items()})
        except TypeError as exc:
            raise ConfigError(f"invalid preprocessing description: {exc}") from exc
