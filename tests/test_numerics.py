"""Exact mode's full-fp32 switch (specs_metric.runtime.numerics)."""

import torch

from factories import make_state_dict
from specs_metric.models.factory import build_model
from specs_metric.runtime.numerics import strict_fp32, tf32_flags
from specs_metric.scoring.scorer import Scorer


def test_strict_fp32_turns_tf32_off_and_restores_the_settings():
    before = tf32_flags()
    with strict_fp32():
        inside = tf32_flags()
    assert tf32_flags() == before
    assert set(inside) == set(before)
    # Whichever flag family this torch has, TF32 is off inside the block.
    assert all(v in ("ieee", False) for v in inside.values()), inside


def test_strict_fp32_restores_after_an_error():
    before = tf32_flags()
    try:
        with strict_fp32():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert tf32_flags() == before


def test_cpu_scorer_in_exact_mode_does_not_touch_the_flags():
    scorer = Scorer(build_model(make_state_dict()), device="cpu")
    before = tf32_flags()
    with scorer.forward_context():
        assert tf32_flags() == before
    assert torch.is_tensor(scorer.encode_tokens(scorer.tokenize(["a cat"])))
