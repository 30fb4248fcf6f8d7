"""The bf16 engine's head: log p(T) change from a change `diff` of the final residual, for many rows.

With d = W dn (the logit change; dn = norm(clean + diff) - norm(clean), W the unembedding [vocab, d_model])
and p the clean next-token distribution,

    change = mean_t d_t - log sum_v p_v exp(d_v).

The sum over the vocabulary costs a [rows, vocab] product and three passes over it. Most neurons move
the final residual so little that a second-order expansion is exact to well under float32's noise:

    sum_v p_v exp(d_v) = 1 + a + b / 2 + R,   a = dn . (W^T p),   b = dn^T (W^T diag(p) W) dn,
    |R| = |sum_v p_v e^xi_v d_v^3 / 6| <= (D e^D / 6) b,   D = max_v ||W_v|| ||dn|| >= max_v |d_v|,

which costs one [d_model, d_model] product per row. Rows whose bound on |R| is above TAYLOR_ABS +
TAYLOR_REL * |change| take the sum over the whole vocabulary instead, with the logit changes in bf16
like the rest of the engine. The bound is rigorous: where the expansion is used, its error is far
below the bf16 rounding it replaces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attribution.models import SiteModel

# A row keeps its second-order value when the remainder bound is below this (nats): 100x below the
# float32 engine's own noise floor (~1e-5) and 10x below the bf16 engine's relative error (~1e-3).
TAYLOR_ABS = 1e-7
TAYLOR_REL = 1e-4

# Vocabulary entries per chunk of the head: the largest head temporary is [rows, HEAD_VOCAB_CHUNK]
# float32 (plus its bf16 logits in the bf16 engine), never [rows, vocab]. The planner counts this.
HEAD_VOCAB_CHUNK = 16384


@dataclass(frozen=True)
class HeadMoments:
    """The clean next-token distribution seen from the final-norm space (per concept, computed once)."""

    probs: Tensor  # [vocab] float32, softmax of the clean logits
    first: Tensor  # [d_model] W^T p: a = dn . first
    second: Tensor  # [d_model, d_model] W^T diag(p) W: b = dn^T second dn
    w_max: float  # max_v ||W_v||, for the bound on max_v |d_v|


@torch.no_grad()
def head_moments(model: SiteModel, final_resid: Tensor) -> HeadMoments:
    """Moments of the clean distribution at `final_resid` [d_model] (the residual after the last block).
    Costs vocab x d_model^2 multiply-adds (0.2 s on SmolLM2 here) and holds d_model^2 floats: once per concept."""
    weight = model.hf.get_output_embeddings().weight.float()  # [vocab, d_model]
    probs = torch.softmax(model.head(final_resid.view(1, -1))[0], dim=-1)  # [vocab]
    return HeadMoments(probs=probs, first=probs @ weight, second=(weight.T * probs) @ weight,
                       w_max=float(weight.norm(dim=-1).max()))


@torch.no_grad()
def log_p_change(model: SiteModel, moments: HeadMoments, resid: Tensor, diff: Tensor, targets: Tensor) -> Tensor:
    """log p(T | clean + diff) - log p(T | clean): resid [1, d_model] clean, diff [rows, d_model] -> [rows]."""
    norm, head = model.arch.final_norm(model.hf), model.hf.get_output_embeddings()
    resid, diff = resid.to(model.head_device), diff.to(model.head_device)
    normed = norm(resid)  # [1, d_model]
    dn = norm(resid + diff).sub_(normed)  # [rows, d_model] float32
    change, bound = second_order_change(moments, dn, head.weight[targets])
    whole = (bound > TAYLOR_ABS + TAYLOR_REL * change.abs()) | ~torch.isfinite(change)
    if bool(whole.any()):
        rows = whole.nonzero()[:, 0]
        change[rows] = _whole_vocabulary_change(model, moments, dn[rows], targets)
    return change


def second_order_change(moments: HeadMoments, dn: Tensor, target_weight: Tensor) -> tuple[Tensor, Tensor]:
    """(change, bound on its error) [rows] from dn [rows, d_model]; target_weight [targets, d_model]."""
    target_change = (dn @ target_weight.float().T).mean(dim=-1)  # [rows]
    a = dn @ moments.first
    b = ((dn @ moments.second) * dn).sum(dim=-1)
    big_d = dn.norm(dim=-1) * moments.w_max
    bound = big_d * torch.exp(big_d) / 6 * b  # >= |R|; inf when big_d overflows exp
    ratio = 1 + a + b / 2  # log(ratio + R) - log(ratio) <= |R| / (ratio - |R|)
    bound = torch.where(ratio > 2 * bound, 2 * bound / ratio, torch.full_like(bound, torch.inf))
    return target_change - torch.log1p(a + b / 2), bound


def _whole_vocabulary_change(model: SiteModel, moments: HeadMoments, dn: Tensor, targets: Tensor) -> Tensor:
    """The exact sum over the vocabulary, logit changes in bf16 (rounding relative to the change): [rows]."""
    dlogits = model.bf16(dn, model.hf.get_output_embeddings().weight)  # [rows, vocab] float32
    target_change = dlogits[:, targets].mean(dim=-1)
    # sum_v p_v (exp(d_v) - 1): the terms are small, so a BLAS dot product's rounding (relative to their
    # sum) stays far below the effect; 1 + that sum would lose ~1e-5 to the dot product's rounding.
    excess = dlogits.exp_().sub_(1.0) @ moments.probs  # [rows]
    change = target_change - torch.log1p(excess)
    overflow = ~torch.isfinite(change)  # a logit change beyond ~88: exp overflowed; shift by the max
    if bool(overflow.any()):
        rows = overflow.nonzero()[:, 0]
        shifted = model.bf16(dn[rows], model.hf.get_output_embeddings().weight)
        targeted = shifted[:, targets].mean(dim=-1)
        shift = shifted.max(dim=-1, keepdim=True).values
        ratio = shifted.sub_(shift).exp_().mul_(moments.probs).sum(dim=-1)
        change[rows] = targeted - (torch.log(ratio) + shift[:, 0])
    return change
