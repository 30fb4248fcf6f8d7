"""Small statistics shared by benchmarks, tests and validation."""
from __future__ import annotations

import torch
from torch import Tensor


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors: Pearson's r of their average ranks (tied values
    share the mean of their positions, as scipy.stats.spearmanr does; NeuronLens scores are 0 for 70%
    of the neurons, and ranking those ties by position would measure the neuron order, not the method)."""
    ranks = torch.stack([average_ranks(a), average_ranks(b)])
    return float(torch.corrcoef(ranks)[0, 1])


def average_ranks(x: Tensor) -> Tensor:  # [n] -> [n] float64 ranks 0..n-1, ties averaged
    order = x.argsort(stable=True)
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # one past each tie group's last position
    ranks = torch.empty(x.numel(), dtype=torch.float64, device=x.device)
    ranks[order] = ((ends - counts) + (ends - 1))[group] / 2
    return ranks


def top_overlap(a: Tensor, b: Tensor, k: int, *, within: int | None = None) -> float:
    """Share of a's top-k (by value) that are in b's top-`within` (default k)."""
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(within or k).indices.tolist())) / k
