"""SPECS where captioning teams already work: optional integrations with other tools.

Each module here serves one tool and needs that tool (an optional extra of the package);
nothing below this layer imports any of them, so ``pip install specs-metric`` keeps its
small footprint:

- :mod:`~specs_metric.integrations.pairs`: the shared core, scoring (image, caption) pairs
  that arrive one call at a time with per-pair errors (no extra dependency);
- :mod:`~specs_metric.integrations.trl`: :class:`~specs_metric.integrations.trl.SPECSReward`,
  a reward function for TRL's trainers (``[trl]``);
- :mod:`~specs_metric.integrations.lmms_eval`: a detailed-captioning task for lmms-eval
  (installed by hand, see ``docs/integrations/lmms-eval.md``);
- :mod:`~specs_metric.integrations.lightning`: a ``torchmetrics.Metric`` (``[lightning]``);
- :mod:`~specs_metric.integrations.hf`: a ``transformers`` ``TrainerCallback`` (``[hf]``);
- :mod:`~specs_metric.integrations.logging`: TensorBoard and W&B for ``specs sweep`` and
  ``specs compare`` (``[logging]``);
- :mod:`~specs_metric.integrations.serve`, :mod:`~specs_metric.integrations.batcher` and
  :mod:`~specs_metric.integrations.client`: the ``specs serve`` HTTP service, its dynamic
  batcher and a client (``[serve]``; the client needs only the standard library).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from specs_metric.errors import UsageError


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or stop with one line naming the extra that installs it.

    >>> require("json", "none", "this example").__name__
    'json'
    >>> require("no_such_module_xyz", "serve", "specs serve")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    specs_metric.errors.UsageError: specs serve needs no_such_module_xyz: pip install '...[serve]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name != module and not module.startswith(exc.name):
            raise  # the module is there but one of its own imports is broken
        raise UsageError(f"{what} needs {module}: pip install 'specs-metric[{extra}]'") from exc
