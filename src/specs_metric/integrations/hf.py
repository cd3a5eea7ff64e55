"""SPECS at every evaluation of a ``transformers`` ``Trainer`` (``pip install
'specs-metric[hf]'``).

:class:`SPECSCallback` calls your ``generate(images) -> captions`` at each evaluation (your
model, your decoding settings), scores the captions against the images and logs the mean
as ``eval_specs`` (TensorBoard and W&B show it as ``eval/specs``), with a small table of
sample captions where the reporter has one (W&B: a ``wandb.Table`` with the images;
TensorBoard: a markdown table as text)::

    callback = SPECSCallback("specs-b32", images=val_images, generate=my_generate)
    trainer = Trainer(model=model, args=args, ..., callbacks=[callback])
    callback.attach(trainer)
    trainer.train()

``attach`` is needed because a ``TrainerCallback`` is never given the trainer, and
``Trainer.evaluate`` has already sent its metrics to the reporters when ``on_evaluate``
runs: the callback logs through ``trainer.log``, which reaches ``state.log_history`` and
every reporter. Without ``attach`` the value only appears in the dict ``evaluate()``
returns. Generation and scoring run on the main process only (``is_world_process_zero``).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence

from PIL import Image

from specs_metric.integrations import require
from specs_metric.integrations.pairs import PairScorer
from specs_metric.scoring.scorer import Scorer, load

transformers = require("transformers", "hf", "SPECSCallback")

logger = logging.getLogger(__name__)


def _pil(image: object) -> Image.Image | str:
    """What ``wandb.Image`` takes: a PIL image or a path."""
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(bytes(image)))
    if isinstance(image, dict):  # an HF {"bytes", "path"} struct
        return _pil(image.get("bytes") or image.get("path"))
    return image if isinstance(image, Image.Image) else os.fspath(image)  # type: ignore[arg-type]


def _markdown(rows: list[list]) -> str:
    lines = ["| image | caption | SPECS |", "|---|---|---|"]
    for name, caption, score in rows:
        text = str(caption).replace("|", "\\|").replace("\n", " ")
        value = "–" if score is None else f"{score:.4f}"
        lines.append(f"| {name} | {text} | {value} |")
    return "\n".join(lines)


class SPECSCallback(transformers.TrainerCallback):
    """Scores the captions ``generate`` writes for ``images`` at each evaluation.

    Args:
        model: a loaded :class:`~specs_metric.scoring.scorer.Scorer`, or a model name or
            path for :func:`~specs_metric.scoring.scorer.load`.
        images: the evaluation images: paths, encoded bytes, HF image structs or PIL images.
        generate: ``generate(images) -> captions``, one caption per image; called with
            ``images`` as given.
        scale: score scale (default ``specs``).
        key: the metric's name in the logs (default ``eval_specs``).
        samples: rows of the sample table (0: none).
        device, precision: how :func:`load` loads ``model``.
    """

    def __init__(
        self,
        model: Scorer | str | os.PathLike[str],
        images: Sequence[object],
        generate: Callable[[list], Sequence[str]],
        *,
        scale: str = "specs",
        key: str = "eval_specs",
        samples: int = 8,
        device: str | None = None,
        precision: str = "fp32",
    ) -> None:
        scorer = model if isinstance(model, Scorer) else load(model, device, precision)
        self.pairs = PairScorer(scorer, scale)
        self.images = list(images)
        self.generate = generate
        self.key, self.samples = key, samples
        self.trainer = None
        self.last: dict | None = None  # the latest evaluation: captions, scores, mean

    def attach(self, trainer) -> SPECSCallback:
        """Log through ``trainer`` (adds the callback to it if it is not there yet)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero:
            return
        captions = list(self.generate(list(self.images)))
        result = self.pairs.score(self.images, captions)
        mean = result.mean()
        unscored = sum(e is not None for e in result.errors)
        for message in [e for e in result.errors if e is not None][:3]:
            logger.warning("SPECSCallback: %s", message)
        self.last = {"step": state.global_step, "captions": captions, "scores": result.scores,
                     "mean": mean}  # fmt: skip
        logs = {f"{self.key}_unscored": unscored}
        if mean is not None:
            logs[self.key] = mean
        if metrics is not None:  # what evaluate() returns
            metrics.update(logs)
        if self.trainer is None:
            logger.warning("SPECSCallback: call attach(trainer) to send %s to the reporters",
                           self.key)  # fmt: skip
            return
        self.trainer.log(logs)
        if self.samples:
            self._sample_table(captions, result.scores, state.global_step)

    def _sample_table(self, captions: list, scores: list, step: int) -> None:
        rows = []
        for i, (image, caption, score) in enumerate(zip(self.images, captions, scores,
                                                        strict=True)):  # fmt: skip
            if i == self.samples:
                break
            name = os.path.basename(image) if isinstance(image, (str, os.PathLike)) else f"#{i}"
            rows.append([name, caption, score])
        tag = self.key.replace("eval_", "eval/", 1) + "_samples"
        from transformers.integrations import TensorBoardCallback, WandbCallback

        for reporter in self.trainer.callback_handler.callbacks:
            if isinstance(reporter, TensorBoardCallback) and reporter.tb_writer is not None:
                reporter.tb_writer.add_text(tag, _markdown(rows), step)
                reporter.tb_writer.flush()
            elif isinstance(reporter, WandbCallback) and reporter._wandb is not None:
                wandb = reporter._wandb
                if wandb.run is None:
                    continue
                data = [[wandb.Image(_pil(self.images[i])), c, s] for i, (_, c, s) in
                        enumerate(rows)]  # fmt: skip
                table = wandb.Table(columns=["image", "caption", "specs"], data=data)
                # WandbCallback plots every metric against train/global_step
                wandb.log({tag: table, "train/global_step": step})
