"""Shared pytest setup: names available to the doctests of the package."""

import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    from factories import make_state_dict

    # A tiny random LongCLIP state dict, for examples that need a model.
    doctest_namespace["tiny_state_dict"] = make_state_dict
