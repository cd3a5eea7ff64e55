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

__all__ = ["SPECSScore", "Scorer", "load", "specs_score", "__version__"]

# The public names load on first use, so that importing the package (e.g. for the
# command line's ``specs --help``) does not import torch.
_LAZY = {
    "SPECSScore": "scoring.metric",
    "specs_score": "scoring.metric",
    "Scorer": "scoring.scorer",
    "load": "scoring.scorer",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f"specs_metric.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'specs_metric' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
