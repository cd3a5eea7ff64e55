"""A detailed-captioning task for lmms-eval, scored with SPECS.

The package ships the task folder ``tasks/specs_detailcaps`` (a YAML and a ``utils.py``);
``python -m specs_metric.integrations.lmms_eval`` prints the folder to pass to lmms-eval's
``--include_path``::

    lmms-eval --model llava_onevision --model_args pretrained=... \\
        --tasks specs_detailcaps --include_path "$(python -m specs_metric.integrations.lmms_eval)"

The model captions each image with the prompt "Describe this image in detail.";
``process_results`` scores each caption against its image with SPECS
(:class:`~specs_metric.integrations.pairs.PairScorer`: a pair that cannot be scored is
counted, not fatal), and the aggregations report the mean (``specs``) and its percentile
bootstrap confidence interval (``specs_ci_low``, ``specs_ci_high``) from
:func:`specs_metric.evaluation.stats.bootstrap`, resampling images (the id column) so
that several captions of one image are drawn together.

The shipped task reads DetailCaps-4870 (``foundation-multimodal-models/DetailCaps-4870``:
the image's encoded bytes in ``binary``, its id in ``image``). ``python -m
specs_metric.integrations.lmms_eval task ...`` writes a task folder for any other data
set with an image column and an id column (:func:`write_task`). The SPECS model is
``$SPECS_MODEL`` (default ``specs-b32``) on ``$SPECS_DEVICE`` (default: CUDA when
available) unless the task names one.

lmms-eval itself is not a dependency (its package metadata requires torchvision); it is
installed without dependencies (``docs/integrations/lmms-eval.md``). Nothing here
imports it.

lmms-eval loads ``utils.py`` once per ``!function`` tag (separate module objects), so the
loaded model is cached here, in this importable module, and shared by all of them.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from specs_metric.errors import UsageError
from specs_metric.evaluation.stats import bootstrap
from specs_metric.integrations.pairs import PairScorer
from specs_metric.io.writing import write_text
from specs_metric.scoring.scales import check_scale
from specs_metric.scoring.scorer import load

TASKS = Path(__file__).resolve().parent / "tasks"
TASK_NAME = "specs_detailcaps"
DEFAULT_PROMPT = "Describe this image in detail."
METRICS = ("specs", "specs_ci_low", "specs_ci_high")

_SCORERS: dict[tuple, PairScorer] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class TaskConfig:
    """What a task's ``utils.py`` fixes: the model, the data set's columns, the CI.

    ``model`` and ``device`` ``None``: ``$SPECS_MODEL`` (default ``specs-b32``) and
    ``$SPECS_DEVICE`` (default: CUDA when available), read when the model is loaded.
    """

    model: str | None = None
    device: str | None = None
    precision: str = "fp32"
    scale: str = "specs"
    image_column: str = "binary"
    id_column: str = "image"
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    def model_name(self) -> str:
        return self.model or os.environ.get("SPECS_MODEL", "specs-b32")

    def device_name(self) -> str | None:
        return self.device or os.environ.get("SPECS_DEVICE") or None


def task_dir() -> Path:
    """The folder to pass to lmms-eval's ``--include_path``."""
    return TASKS


def pair_scorer(config: TaskConfig) -> PairScorer:
    """The task's scorer, loaded once per process (shared by every copy of ``utils.py``)."""
    key = (config.model_name(), config.device_name(), config.precision, config.scale)
    with _LOCK:
        if key not in _SCORERS:
            scorer = load(key[0], device=key[1], precision=config.precision)
            _SCORERS[key] = PairScorer(scorer, config.scale)
        return _SCORERS[key]


def _cell(doc: dict, column: str) -> object:
    if column not in doc:
        raise UsageError(
            f"the document has no column {column!r} (its columns: {', '.join(sorted(doc))}); "
            "write a task for this data set: python -m specs_metric.integrations.lmms_eval "
            "task --help"
        )
    return doc[column]


def doc_to_visual(doc: dict, config: TaskConfig) -> list[Image.Image]:
    """The document's image as the captioning model gets it (one RGB PIL image)."""
    cell = _cell(doc, config.image_column)
    if isinstance(cell, dict):  # an HF {"bytes", "path"} struct
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        cell = Image.open(io.BytesIO(bytes(cell)))
    elif isinstance(cell, (str, os.PathLike)):
        cell = Image.open(cell)
    if not isinstance(cell, Image.Image):
        raise UsageError(f"column {config.image_column!r} holds no image ({type(cell).__name__})")
    return [cell.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The prompt: ``lmms_eval_specific_kwargs["prompt"]`` of the YAML, else the default."""
    return (lmms_eval_specific_kwargs or {}).get("prompt", DEFAULT_PROMPT)


def process_results(doc: dict, results: list, config: TaskConfig) -> dict[str, dict]:
    """Score the generated caption (``results[0]``) against the document's image.

    Returns the same item under each metric: ``{"id", "score", "error"}`` (``score``
    ``None`` and the reason in ``error`` for a pair that cannot be scored).
    """
    caption = results[0] if results else None
    image = _cell(doc, config.image_column)
    record = pair_scorer(config).score([image], [caption], ["caption"]).records[0]
    item = {"id": str(_cell(doc, config.id_column)), "score": record["score"],
            "error": record["error"]}  # fmt: skip
    return dict.fromkeys(METRICS, item)


def _scored(items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    kept = [i for i in items if i.get("score") is not None]
    return (np.array([i["score"] for i in kept], dtype=np.float64),
            np.array([i["id"] for i in kept], dtype=object))  # fmt: skip


def summary(items: list[dict], config: TaskConfig) -> dict:
    """Mean of the scored items with its bootstrap CI over images, and the counts."""
    scores, ids = _scored(items)
    out = {"n": len(items), "n_scored": int(scores.size), "level": config.level,
           "n_boot": config.n_boot}  # fmt: skip
    if scores.size == 0:
        return {**out, "mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    estimate = bootstrap(np.mean, scores, groups=ids, n_boot=config.n_boot, level=config.level,
                         seed=config.seed)  # fmt: skip
    return {**out, "mean": estimate.value, "ci_low": estimate.low, "ci_high": estimate.high}


def aggregate(items: list[dict], config: TaskConfig, which: str = "mean") -> float:
    """One number of :func:`summary` (``mean``, ``ci_low`` or ``ci_high``)."""
    return float(summary(items, config)[which])


def task_functions(config: TaskConfig) -> dict:
    """The functions a task's ``utils.py`` exposes to its YAML, bound to ``config``."""
    check_scale(config.scale)

    def specs_doc_to_visual(doc):
        return doc_to_visual(doc, config)

    def specs_process_results(doc, results):
        return process_results(doc, results, config)

    def specs_mean(items):
        return aggregate(items, config, "mean")

    def specs_ci_low(items):
        return aggregate(items, config, "ci_low")

    def specs_ci_high(items):
        return aggregate(items, config, "ci_high")

    return {
        "specs_doc_to_visual": specs_doc_to_visual,
        "specs_doc_to_text": doc_to_text,
        "specs_process_results": specs_process_results,
        "specs_mean": specs_mean,
        "specs_ci_low": specs_ci_low,
        "specs_ci_high": specs_ci_high,
    }


# --- writing task folders -------------------------------------------------------------
_YAML = """\
# SPECS on {what} (written by `python -m specs_metric.integrations.lmms_eval task`).
task: {name}
dataset_path: {dataset_path}
{dataset_kwargs}test_split: {split}
output_type: generate_until
doc_to_visual: !function utils.specs_doc_to_visual
doc_to_text: !function utils.specs_doc_to_text
doc_to_target: ""
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
# process_results scores from the image column, which lmms-eval would otherwise drop
process_results_use_image: true
process_results: !function utils.specs_process_results
metric_list:
  - metric: specs
    aggregation: !function utils.specs_mean
    higher_is_better: true
  - metric: specs_ci_low
    aggregation: !function utils.specs_ci_low
    higher_is_better: true
  - metric: specs_ci_high
    aggregation: !function utils.specs_ci_high
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    prompt: {prompt}
metadata:
  version: 0.1
"""

_UTILS = '''"""lmms-eval functions of the task {name}: the work is done by
specs_metric.integrations.lmms_eval (written by `python -m specs_metric.integrations.lmms_eval
task`)."""

from specs_metric.integrations.lmms_eval import TaskConfig, task_functions

CONFIG = TaskConfig({config})
globals().update(task_functions(CONFIG))
'''


def _config_arguments(config: TaskConfig) -> str:
    defaults = asdict(TaskConfig())
    given = {k: v for k, v in asdict(config).items() if v != defaults[k]}
    return ", ".join(f"{k}={v!r}" for k, v in given.items())


def task_files(
    name: str = TASK_NAME,
    dataset_path: str = "foundation-multimodal-models/DetailCaps-4870",
    *,
    config: TaskConfig | None = None,
    split: str = "test",
    from_disk: bool = False,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 1024,
) -> dict[str, str]:
    """The YAML and ``utils.py`` of a task (file name -> text)."""
    config = config or TaskConfig()
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UsageError(f"task name {name!r}: use letters, digits, '_', '.' and '-'")
    what = "DetailCaps-4870" if dataset_path.endswith("DetailCaps-4870") else dataset_path
    kwargs = ""
    if from_disk:
        kwargs = "dataset_kwargs:\n  load_from_disk: true\n"
    elif what == "DetailCaps-4870":
        kwargs = "dataset_kwargs:\n  token: true\n"
    yaml = _YAML.format(
        what=what, name=name, dataset_path=json.dumps(dataset_path), dataset_kwargs=kwargs,
        split=json.dumps(split), max_new_tokens=max_new_tokens, prompt=json.dumps(prompt),
    )  # fmt: skip
    return {f"{name}.yaml": yaml, "utils.py": _UTILS.format(name=name,
                                                             config=_config_arguments(config))}


def write_task(folder: str | os.PathLike[str], **kwargs) -> Path:
    """Write a task folder (see :func:`task_files`); returns the folder, for
    ``--include_path``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, text in task_files(**kwargs).items():
        write_text(folder / file_name, text)
    return folder
