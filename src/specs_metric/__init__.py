"""specs-metric: SPECS, reference-free and specificity-aware scoring of long image captions.

Example:
    >>> import specs_metric
    >>> scorer = specs_metric.load("specs-b32")              # doctest: +SKIP
    >>> scorer.score(["cat.png"], ["A cat on a red sofa."])  # doctest: +SKIP
    array([0.43...])
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("specs-metric")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

from specs_metric.metric import SPECSScore, specs_score  # noqa: E402
from specs_metric.scorer import Scorer, load  # noqa: E402

__all__ = ["SPECSScore", "Scorer", "load", "specs_score", "__version__"]
