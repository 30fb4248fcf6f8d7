"""The engines' head: log p(T) of many final residuals, in vocabulary chunks, without host syncs.

Exact (float32 engine): log p(T) = mean_t logit_t - logsumexp_v logit_v, the logsumexp taken online over
chunks of HEAD_VOCAB_CHUNK vocabulary entries, so [rows, vocab] float32 never exists whole.

bf16 engine: the log p(T) change from a change `diff` of the final residual. With d = W dn (the logit
change; dn = norm(clean + diff) - norm(clean), W the unembedding [vocab, d_model]) and p the clean
next-token distribution,

    change = mean_t d_t - log sum_v p_v exp(d_v).

Most neurons move the final residual so little that a second-order expansion is exact to well under
float32's noise:

    sum_v p_v exp(d_v) = 1 + a + b / 2 + R,   a = dn . (W^T p),   b = dn^T (W^T diag(p) W) dn,
    |R| = |sum_v p_v e^xi_v d_v^3 / 6| <= (D e^D / 6) b,   D = max_v ||W_v|| ||dn|| >= max_v |d_v|,

which costs one [d_model, d_model] product per row. Rows whose bound on |R| is above TAYLOR_ABS +
TAYLOR_REL * |change| take the sum over the whole vocabulary instead (logit changes in bf16 like the
rest of the engine). Which rows those are is known only on the device: `DeferredHead` keeps them
there and sums them at the end of a shard, so a shard's batches never wait for the host.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from attribution.models import SiteModel
from attribution.sites import held_weight

# A row keeps its second-order value when the remainder bound is below this (nats): 100x below the
# float32 engine's own noise floor (~1e-5) and 10x below the bf16 engine's relative error (~1e-3).
TAYLOR_ABS = 1e-7
TAYLOR_REL = 1e-4

# Vocabulary entries per chunk of the head: the largest head temporary is [rows, HEAD_VOCAB_CHUNK]
# float32 (plus its bf16 logits in the bf16 engine), never [rows, vocab]. The planner counts this.
HEAD_VOCAB_CHUNK = 16384


def _head_weight(model: SiteModel) -> Tensor:  # [vocab, d_model] as held (float32, or bf16 held once)
    return held_weight(model.hf.get_output_embeddings())


def _chunks(vocab: int):
    for start in range(0, vocab, HEAD_VOCAB_CHUNK):
        yield slice(start, min(start + HEAD_VOCAB_CHUNK, vocab))


def _compute_dtype(x: Tensor) -> torch.dtype:  # float32, or float64 for a float64 model (the references)
    return torch.promote_types(x.dtype, torch.float32)


def chunked_logsumexp(logits_of: Callable[[slice], Tensor], vocab: int) -> Tensor:
    """logsumexp over the vocabulary of logits given chunk by chunk: logits_of(slice) -> [rows, chunk].
    Online: a running max and a sum of exp(logit - max) rescaled when the max grows. -> [rows]."""
    top = total = None
    for part in _chunks(vocab):
        logits = logits_of(part)
        part_top = logits.max(dim=-1).values
        if top is None:
            top, total = part_top, torch.zeros_like(part_top)
        new_top = torch.maximum(top, part_top)
        total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(dim=-1)
        top = new_top
    return top + torch.log(total)


@torch.no_grad()
def head_log_p(model: SiteModel, resid: Tensor, targets: Tensor) -> Tensor:
    """Mean over targets of log p(target | resid), exact: resid [rows, d_model] -> [rows].

    The final norm, then logits one vocabulary chunk at a time (a bf16-held head is upcast one chunk
    at a time), so the float32 engine's head never holds [rows, vocab]."""
    head = model.hf.get_output_embeddings()
    normed = model.arch.final_norm(model.hf)(resid.to(model.head_device))  # [rows, d_model]
    dtype = _compute_dtype(normed)
    normed = normed.to(dtype)
    weight, bias = _head_weight(model), head.bias

    def logits_of(part: slice) -> Tensor:  # [rows, chunk]
        out = normed @ weight[part].to(dtype).T
        return out if bias is None else out + bias[part].to(dtype)

    index = targets.to(normed.device)
    target_logits = normed @ weight[index].to(dtype).T  # [rows, targets]
    if bias is not None:
        target_logits = target_logits + bias[index].to(dtype)
    return target_logits.mean(dim=-1) - chunked_logsumexp(logits_of, weight.shape[0])


@dataclass(frozen=True)
class HeadMoments:
    """The clean next-token distribution seen from the final-norm space (per concept, computed once)."""

    probs: Tensor  # [vocab] float32, softmax of the clean logits
    first: Tensor  # [d_model] W^T p: a = dn . first
    second: Tensor  # [d_model, d_model] W^T diag(p) W: b = dn^T second dn
    w_max: float  # max_v ||W_v||, for the bound on max_v |d_v|

    def to(self, device: torch.device) -> "HeadMoments":
        return HeadMoments(self.probs.to(device), self.first.to(device), self.second.to(device), self.w_max)


@torch.no_grad()
def head_moments(model: SiteModel, final_resid: Tensor) -> HeadMoments:
    """Moments of the clean distribution at `final_resid` [d_model] (the residual after the last block).

    Built in vocabulary chunks: the largest temporary is [HEAD_VOCAB_CHUNK, d_model] float32, never
    [vocab, d_model]. Costs vocab x d_model^2 multiply-adds and holds d_model^2 floats: once per concept."""
    weight = _head_weight(model)
    normed = model.arch.final_norm(model.hf)(final_resid.view(1, -1).to(model.head_device)).float()[0]  # [d_model]
    bias = model.hf.get_output_embeddings().bias
    logits = torch.cat([weight[part].float() @ normed for part in _chunks(weight.shape[0])])  # [vocab]
    if bias is not None:
        logits = logits + bias.float()
    probs = torch.softmax(logits, dim=-1)
    d_model = weight.shape[1]
    first = torch.zeros(d_model, device=weight.device)
    second = torch.zeros(d_model, d_model, device=weight.device)
    w_max = torch.zeros((), device=weight.device)
    for part in _chunks(weight.shape[0]):
        chunk = weight[part].float()  # [chunk, d_model]
        first += probs[part] @ chunk
        second.addmm_(chunk.T * probs[part], chunk)
        w_max = torch.maximum(w_max, chunk.norm(dim=-1).max())
    return HeadMoments(probs=probs, first=first, second=second, w_max=float(w_max))


class HeadMomentsCache:
    """Per-concept head moments on the head's device, at most `capacity` concepts at a time.

    Owned by whoever scores the concepts (an actor): the least recently used concept's moments are
    evicted when another one is needed, so a run over many concepts holds `capacity` x d_model^2 floats.
    """

    def __init__(self, capacity: int = 1):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._moments: OrderedDict[str, HeadMoments] = OrderedDict()

    def get(self, concept: str, make: Callable[[], HeadMoments]) -> HeadMoments:
        moments = self._moments.pop(concept, None)
        if moments is None:
            while len(self._moments) >= self.capacity:
                self._moments.popitem(last=False)
            moments = make()
        self._moments[concept] = moments  # most recently used last
        return moments

    def __len__(self) -> int:
        return len(self._moments)


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


class DeferredHead:
    """The bf16 engine's head over one shard: `add` each batch (no host sync), `finish` once.

    Each batch gets its second-order change on the device; rows whose bound is too loose are marked
    there, and their dn (kept in bf16, the precision the whole-vocabulary product reads it in) waits
    for `finish`, which picks them out with the shard's only host sync and sums the whole vocabulary.
    """

    def __init__(self, model: SiteModel, moments: HeadMoments, targets: Tensor):
        self.model, self.moments, self.targets = model, moments, targets.to(model.head_device)
        self.norm = model.arch.final_norm(model.hf)
        self.target_weight = _head_weight(model)[self.targets]  # [targets, d_model]
        self.changes: list[Tensor] = []
        self.whole: list[Tensor] = []
        self.dns: list[Tensor] = []
        self.whole_rows = 0  # rows that took the whole-vocabulary sum (known after finish)

    @torch.no_grad()
    def add(self, resid: Tensor, diff: Tensor) -> None:
        """resid [1, d_model] the clean final residual, diff [rows, d_model] the rows' differences."""
        device = self.model.head_device
        resid, diff = resid.to(device), diff.to(device)
        normed = self.norm(resid)  # [1, d_model]
        dn = self.norm(resid + diff).sub_(normed)  # [rows, d_model] float32
        change, bound = second_order_change(self.moments, dn, self.target_weight)
        self.changes.append(change)
        self.whole.append((bound > TAYLOR_ABS + TAYLOR_REL * change.abs()) | ~torch.isfinite(change))
        self.dns.append(dn.to(self.model.bf16.dtype))

    @torch.no_grad()
    def finish(self, *, batch_rows: int = 512) -> Tensor:  # [rows of every batch]
        if not self.changes:
            return torch.zeros(0)
        change, whole, dn = torch.cat(self.changes), torch.cat(self.whole), torch.cat(self.dns)
        self.changes, self.whole, self.dns = [], [], []
        rows = whole.nonzero()[:, 0]  # the one host sync of the shard
        self.whole_rows += len(rows)
        for start in range(0, len(rows), batch_rows):
            part = rows[start:start + batch_rows]
            change[part] = whole_vocabulary_change(self.model, self.moments, dn[part], self.targets)
        return change


@torch.no_grad()
def log_p_change(model: SiteModel, moments: HeadMoments, resid: Tensor, diff: Tensor, targets: Tensor) -> Tensor:
    """log p(T | clean + diff) - log p(T | clean): resid [1, d_model] clean, diff [rows, d_model] -> [rows]."""
    head = DeferredHead(model, moments, targets)
    head.add(resid, diff)
    return head.finish(batch_rows=max(1, diff.shape[0]))


def whole_vocabulary_change(model: SiteModel, moments: HeadMoments, dn: Tensor, targets: Tensor) -> Tensor:
    """The exact sum over the vocabulary, logit changes in bf16 (rounding relative to the change): [rows].

    One pass over vocabulary chunks keeps two sums: sum_v p_v (exp(d_v) - 1) (precise for the small
    changes most rows have: 1 + that sum would lose ~1e-5 to rounding) and, with a running max m,
    sum_v p_v exp(d_v - m) (finite when a logit change is beyond exp's range, ~88). No host sync."""
    weight = _head_weight(model)
    weight = model.bf16.low(("head",), lambda: weight)  # [vocab, d_model] bf16: the held head, else one copy
    mm = model.bf16.mm
    target_change = mm(dn, weight[targets]).mean(dim=-1)  # [rows]
    excess = torch.zeros(dn.shape[0], device=dn.device)
    top = torch.full((dn.shape[0],), -torch.inf, device=dn.device)
    shifted = torch.zeros(dn.shape[0], device=dn.device)
    for part in _chunks(weight.shape[0]):
        dlogits = mm(dn, weight[part])  # [rows, chunk] float32
        probs = moments.probs[part]
        new_top = torch.maximum(top, dlogits.max(dim=-1).values)
        shifted = shifted * torch.exp(top - new_top) + torch.exp(dlogits - new_top[:, None]) @ probs
        top = new_top
        excess += dlogits.exp_().sub_(1.0) @ probs
    change = target_change - torch.log1p(excess)
    return torch.where(torch.isfinite(change), change, target_change - (torch.log(shifted) + top))
