"""A synthetic world with known facts, for measuring specificity without human labels.

Scenes (:mod:`~specs_metric.synth.world`) are rendered with PIL
(:mod:`~specs_metric.synth.render`) and described one fact per segment
(:mod:`~specs_metric.synth.captions`); :func:`generate` writes the sDCI layout and graded
candidates (:mod:`~specs_metric.synth.writer`).
"""

from specs_metric.synth.captions import fact_f1, parse_segment, segment_text
from specs_metric.synth.render import render_scene
from specs_metric.synth.world import Fact, Scene, SceneObject, sample_scene, truth
from specs_metric.synth.writer import generate

__all__ = [
    "Fact",
    "Scene",
    "SceneObject",
    "fact_f1",
    "generate",
    "parse_segment",
    "render_scene",
    "sample_scene",
    "segment_text",
    "truth",
]
