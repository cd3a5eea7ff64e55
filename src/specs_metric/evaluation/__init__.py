"""Benchmarks: intrinsic specificity, agreement with human judgments, retrieval, zero-shot."""
