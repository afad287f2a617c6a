"""Trainer helpers: balanced sampling across concepts."""

from __future__ import annotations

from training.trainer import balance_by_concept


def test_balanced_sampling_evens_out_concepts():
    rows = [{"concept": "big", "i": i} for i in range(7)] + [{"concept": "small", "i": i} for i in range(3)]
    balanced = balance_by_concept(rows, seed=0)
    counts = {c: sum(r["concept"] == c for r in balanced) for c in ("big", "small")}
    assert counts == {"big": 7, "small": 7}
    small = [r["i"] for r in balanced if r["concept"] == "small"]
    assert all(small.count(i) >= 2 for i in range(3))  # whole copies before the sampled remainder
    assert balance_by_concept(rows, seed=0) == balanced
