"""SPECS as a reward function for TRL's trainers (``GRPOTrainer``, ``RLOOTrainer``, ...).

TRL calls a reward function as ``f(prompts=..., completions=..., completion_ids=...,
**columns)``: ``columns`` holds every other column of the training set (already repeated
over the generations of each prompt) and, in TRL 1.x, ``trainer_state``, ``log_extra`` and
``log_metric``. :class:`SPECSReward` takes the image of each completion from one of those
columns and returns its SPECS, or ``None`` (TRL's "no reward for this row") where the pair
cannot be scored.

**Name the image column for your policy.** TRL treats a column named ``image`` or
``images`` as the *policy's* input (a vision-language model with a processor). A
text-only policy that writes captions from a text description needs the images in
another column, e.g. ``image_path``, and ``SPECSReward(image_column="image_path")``.
Both layouts work; see ``docs/integrations/trl.md``.

Needs nothing from TRL itself (the signature is all there is to it); ``pip install
'specs-metric[trl]'`` installs TRL for training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from PIL import Image

from specs_metric.errors import UsageError
from specs_metric.integrations.pairs import PairScorer
from specs_metric.scoring.scorer import Scorer, load

logger = logging.getLogger(__name__)

# One image given for every completion (not a list of them).
_SINGLE_IMAGE = (str, bytes, bytearray, os.PathLike, dict, Image.Image)


def completion_text(completion: object) -> object:
    """The text of a completion: a string as it is; in the conversational format (a list of
    ``{"role", "content"}`` messages) the assistant's content, its text parts joined when
    the content is a list of parts. Anything else is returned unchanged (and later refused
    as a caption that is not a string).

    >>> completion_text("A red circle.")
    'A red circle.'
    >>> completion_text([{"role": "assistant", "content": "A red circle."}])
    'A red circle.'
    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "A"},
    ...                                                    {"type": "text", "text": "dog."}]}])
    'A dog.'
    """
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, list) or not all(isinstance(m, dict) for m in completion):
        return completion
    messages = [m for m in completion if m.get("role") == "assistant"] or completion[-1:]
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            content = " ".join(t for t in texts if isinstance(t, str))
        if not isinstance(content, str):
            return content
        parts.append(content)
    return " ".join(parts)


def _one_image(cell: object) -> object:
    """A column cell as one image: a list of exactly one image (TRL's ``images`` column)
    is that image; a longer list stays a list (and is refused as an image)."""
    if isinstance(cell, (list, tuple)) and len(cell) == 1:
        return cell[0]
    return cell


def match_images(images: object, n: int) -> list[object]:
    """One image per completion: ``images`` as they are when there are ``n``; one per
    prompt (``n`` a multiple of their number) repeated over its consecutive generations;
    a single image for all.

    >>> match_images(["a.png", "b.png"], 4)
    ['a.png', 'a.png', 'b.png', 'b.png']
    >>> match_images("a.png", 2)
    ['a.png', 'a.png']
    """
    if isinstance(images, _SINGLE_IMAGE):
        return [images] * n
    images = [_one_image(c) for c in images]  # type: ignore[union-attr]
    if len(images) == n:
        return images
    if images and n % len(images) == 0:
        k = n // len(images)
        return [image for image in images for _ in range(k)]
    raise UsageError(
        f"{len(images)} images for {n} completions: give one image per completion or one "
        "per prompt"
    )


class SPECSReward:
    """SPECS of each completion against its image, as a TRL reward function.

    Args:
        model: a loaded :class:`~specs_metric.scoring.scorer.Scorer`, or a model name or
            path for :func:`~specs_metric.scoring.scorer.load`.
        image_column: the column holding each prompt's image: PIL images, paths, encoded
            bytes or HF ``{"bytes", "path"}`` structs (default ``image``; see the module
            docstring about naming it for a text-only policy).
        scale: score scale (default ``specs``, in [0, 1]).
        device, precision, long_captions: how :func:`load` loads ``model`` (ignored for a
            loaded Scorer).
        name: the reward's ``__name__``: TRL logs ``rewards/<name>/mean``.
        image_root: the folder relative image paths resolve against (default: the current
            folder).
        image_batch, token_budget: forward-pass sizes (default: the device batch policy of
            ``specs score``).

    Calling it returns one ``float`` per completion, or ``None`` for a completion that
    cannot be scored (no image, an unreadable image, an empty completion); each kind of
    reason is logged once, as a warning of the ``specs_metric.integrations.trl`` logger.
    """

    def __init__(
        self,
        model: Scorer | str | os.PathLike[str] = "specs-b32",
        *,
        image_column: str = "image",
        scale: str = "specs",
        device: str | None = None,
        precision: str = "fp32",
        long_captions: str = "truncate",
        name: str = "specs",
        image_root: str | os.PathLike[str] | None = None,
        image_batch: int | None = None,
        token_budget: int | None = None,
    ) -> None:
        scorer = (
            model
            if isinstance(model, Scorer)
            else load(model, device=device, precision=precision, long_captions=long_captions)
        )
        self.image_column = image_column
        self.__name__ = name
        self.pairs = PairScorer(
            scorer, scale, image_root=image_root, image_batch=image_batch,
            token_budget=token_budget,
        )  # fmt: skip
        self._reasons_logged: set[str] = set()

    @property
    def scorer(self) -> Scorer:
        return self.pairs.scorer

    def __repr__(self) -> str:
        return (
            f"SPECSReward(model={self.scorer.name!r}, image_column={self.image_column!r}, "
            f"scale={self.pairs.scale!r})"
        )

    def _images(self, columns: dict, n: int) -> list[object]:
        if self.image_column not in columns:
            given = sorted(k for k in columns if k not in ("trainer_state", "log_extra",
                                                          "log_metric"))  # fmt: skip
            raise UsageError(
                f"the SPECS reward reads images from the column {self.image_column!r}, which "
                f"the data set does not have (its columns: {', '.join(given) or 'none'}); "
                "pass image_column='<the column of the images>'"
            )
        return match_images(columns[self.image_column], n)

    def _log_reasons(self, errors: Sequence[str | None], n: int) -> None:
        failed = [e for e in errors if e is not None]
        for message in failed:
            reason = message.split(": ", 1)[-1]
            if reason not in self._reasons_logged:
                self._reasons_logged.add(reason)
                logger.warning(
                    "SPECS reward: %d of %d completions not scored (reward None), e.g. %s; "
                    "this reason is logged once",
                    len(failed), n, message,
                )  # fmt: skip
            else:
                logger.debug("SPECS reward: %s", message)

    def __call__(
        self,
        prompts: Sequence[object] | None = None,
        completions: Sequence[object] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        **columns: object,
    ) -> list[float | None]:
        if completions is None:
            raise UsageError("the SPECS reward needs completions=")
        n = len(completions)
        captions = [completion_text(c) for c in completions]
        images = self._images(columns, n)
        labels = [f"completion {i + 1}" for i in range(n)]
        result = self.pairs.score(images, captions, labels)
        self._log_reasons(result.errors, n)
        log_metric = columns.get("log_metric")
        if callable(log_metric):  # TRL 1.x: an extra scalar in the trainer's logs
            unscored = sum(e is not None for e in result.errors)
            log_metric(f"{self.__name__}/unscored_frac", unscored / max(n, 1))
        return result.scores
