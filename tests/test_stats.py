"""Spearman's rank correlation with ties, against a plain Python implementation."""
from __future__ import annotations

import math

import torch

from attribution.stats import average_ranks, spearman, top_overlap


def plain_average_ranks(values: list[float]) -> list[float]:
    """Rank i of a value = mean of the 0-based positions its tie group occupies in sorted order."""
    ordered = sorted(values)
    return [sum(p for p, v in enumerate(ordered) if v == x) / ordered.count(x) for x in values]


def plain_spearman(a: list[float], b: list[float]) -> float:
    ra, rb = plain_average_ranks(a), plain_average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_average_ranks_share_the_mean_position_of_a_tie():
    assert average_ranks(torch.tensor([3.0, 0.0, 0.0, 5.0, 0.0])).tolist() == [3.0, 1.0, 1.0, 4.0, 1.0]


def test_spearman_equals_the_plain_computation_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, generator=generator)
    a[torch.rand(300, generator=generator) < 0.7] = 0.0  # 70% tied at 0, like NeuronLens non-candidates
    b = a + 0.5 * torch.randn(300, generator=generator)
    assert abs(spearman(a, b) - plain_spearman(a.tolist(), b.tolist())) < 1e-12
    # a tie's ranks do not depend on where the tied neurons sit
    order = torch.randperm(300, generator=generator)
    assert abs(spearman(a[order], b[order]) - spearman(a, b)) < 1e-12
    assert spearman(a, a) == 1.0 and abs(spearman(a, -a) + 1.0) < 1e-12


def test_top_overlap():
    a, b = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0])
    assert top_overlap(a, b, 3) == 2 / 3 and top_overlap(a, b, 2) == 0.5 and top_overlap(a, b, 2, within=5) == 1.0
