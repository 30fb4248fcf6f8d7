"""Small statistics shared by benchmarks, tests and validation."""
from __future__ import annotations

import torch
from torch import Tensor


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position)."""
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def top_overlap(a: Tensor, b: Tensor, k: int, *, within: int | None = None) -> float:
    """Share of a's top-k (by value) that are in b's top-`within` (default k)."""
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(within or k).indices.tolist())) / k
