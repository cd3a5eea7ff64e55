"""What every SPECS reward function shares, whether it scores in this process
(:class:`~specs_metric.integrations.trl.SPECSReward`) or calls a service
(:class:`~specs_metric.integrations.client.SPECSServiceReward`): TRL's reward signature,
the completion's text, one image per completion, and each reason for a missing reward
logged once. Imports no torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from PIL import Image

from specs_metric.errors import UsageError

# The keyword arguments TRL 1.x adds to the data set's columns.
TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric")

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


def reward_images(columns: Mapping[str, object], image_column: str, n: int) -> list[object]:
    """The images of ``n`` completions from the reward's keyword arguments.

    Raises:
        UsageError: no such column (the message lists the columns there are), or a number
            of images that fits neither the completions nor the prompts.
    """
    if image_column not in columns:
        given = sorted(k for k in columns if k not in TRL_EXTRAS)
        raise UsageError(
            f"the SPECS reward reads images from the column {image_column!r}, which the data "
            f"set does not have (its columns: {', '.join(given) or 'none'}); pass "
            "image_column='<the column of the images>'"
        )
    return match_images(columns[image_column], n)


class ReasonLog:
    """Logs why completions got no reward: each reason (a message without its pair's
    label) once, as a warning; repeats at debug level."""

    def __init__(self, logger: logging.Logger, what: str = "SPECS reward") -> None:
        self.logger, self.what = logger, what
        self.seen: set[str] = set()

    def __call__(self, errors: Sequence[str | None]) -> None:
        failed = [e for e in errors if e is not None]
        for message in failed:
            reason = message.split(": ", 1)[-1]
            if reason in self.seen:
                self.logger.debug("%s: %s", self.what, message)
                continue
            self.seen.add(reason)
            self.logger.warning(
                "%s: %d of %d completions not scored (reward None), e.g. %s; this reason is "
                "logged once", self.what, len(failed), len(errors), message,
            )  # fmt: skip


def log_unscored(columns: Mapping[str, object], name: str, errors: Sequence[str | None]) -> None:
    """TRL 1.x passes ``log_metric``: the fraction of completions without a reward goes
    into the trainer's logs as ``<name>/unscored_frac``."""
    log_metric = columns.get("log_metric")
    if callable(log_metric):
        unscored = sum(e is not None for e in errors)
        log_metric(f"{name}/unscored_frac", unscored / max(len(errors), 1))


class RewardFunction:
    """TRL's reward protocol, shared by the rewards of this package: called as
    ``f(prompts=..., completions=..., completion_ids=..., **columns)``, it reads each
    completion's text (conversational completions: the assistant's content) and its image
    from ``columns[self.image_column]``, and returns one float (or ``None``) per completion.
    Subclasses set ``image_column``, ``__name__`` and ``log_reasons`` and implement
    :meth:`rewards`; every reason a completion got ``None`` is logged (once per reason)."""

    image_column: str
    __name__: str
    log_reasons: ReasonLog

    def rewards(
        self, images: list[object], captions: list[str]
    ) -> tuple[list[float | None], list[str | None]]:
        """Scores and errors (``completion N: ...``) of the completions, in order."""
        raise NotImplementedError

    def __call__(
        self,
        prompts: Sequence[object] | None = None,
        completions: Sequence[object] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        **columns: object,
    ) -> list[float | None]:
        if completions is None:
            raise UsageError("the SPECS reward needs completions=")
        captions = [completion_text(c) for c in completions]
        images = reward_images(columns, self.image_column, len(completions))
        scores, errors = self.rewards(images, captions)
        self.log_reasons(errors)
        log_unscored(columns, self.__name__, errors)
        return scores
