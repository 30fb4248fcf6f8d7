"""Concept-specific rankings (pure math on effect arrays; no model, no I/O).

A neuron carries a concept when ablating it moves the concept's log p(T) and little else. The
off-target effect of a neuron is its largest |effect| on any contrast concept (the reference set's
AtP estimates, configs/concepts/reference.yaml, and the run's other concepts). Ablating a set moves a
concept by about the sum of its neurons' signed effects (first order), so a set is chosen to make
the own sum large against the largest off-target sum: see `specific_order`.

Shapes: effect [n] (the concept's exact NEAT effect of each neuron), off [r, n] (signed effects of
the n neurons on r contrast concepts).
"""
from __future__ import annotations

import torch
from torch import Tensor

# The penalty of the carry ranking (the prompt methods' specific ranking), chosen on the built-in
# concepts (README "Concept-specific rankings"): of penalties 1-20, 5 and 10 left the fewest built-ins
# below prompt specificity 5 (2 of 6), and 10 had the higher median (8.96 against 6.50).
CARRY_PENALTY = 10.0
# The penalty of the selection that picks the prompt method's specific candidates (the same: the
# candidates hold the neurons the final ranking chooses on the estimates).
CANDIDATE_PENALTY = CARRY_PENALTY
MEASURED_K = 10  # the top-k the run's measured choice measures (attribution/measured_selection.py): the bar's k
GENERIC_SHARE = 0.5  # a neuron is generic when it is in the top 1% by |effect| of at least this share of concepts


def off_target(off: Tensor) -> tuple[Tensor, Tensor]:
    """[r, n] -> (largest |effect| over the r concepts [n], which concept [n] int64)."""
    values, which = off.abs().max(dim=0)
    return values, which


def specificity_ratio(effect: Tensor, off: Tensor, *, floor: float) -> Tensor:
    """|effect| / max(largest off-target |effect|, floor): [n]. The floor keeps neurons with a tiny
    effect on everything from ranking high by dividing by almost nothing."""
    worst, _ = off_target(off)
    return effect.abs() / worst.clamp(min=floor)


def specific_order(effect: Tensor, off: Tensor, *, k: int, penalty: float = 5.0, candidates: int = 1000,
                   prefix: Tensor | None = None) -> Tensor:
    """Greedy set selection: the first k neurons (indices into n) of a concept-specific ranking.

    Step j adds the candidate that maximises |sum of own effects| - penalty * max over contrast concepts
    |sum of their effects| of the set chosen so far plus it (first-order joint effects, signed, so
    neurons whose effects cancel on the own concept are not picked together). Candidates: the top
    `candidates` neurons by |effect|. `prefix` (indices into n) is taken first, as given, and the
    greedy continues from it. Returns [k] int64 (fewer when there are fewer neurons).
    """
    effect, off = effect.double(), off.double()
    pool = effect.abs().topk(min(candidates, effect.numel())).indices  # [m]
    own_pool, off_pool = effect[pool], off[:, pool]  # [m], [r, m]
    own, others = torch.zeros((), dtype=torch.float64), torch.zeros(off.shape[0], dtype=torch.float64)
    taken = torch.zeros(len(pool), dtype=torch.bool)
    chosen = []
    for index in ([] if prefix is None else [int(i) for i in prefix])[:k]:
        chosen.append(index)
        own, others = own + effect[index], others + off[:, index]
        taken |= pool == index
    for _ in range(min(k - len(chosen), int((~taken).sum()))):
        gain = (own + own_pool).abs() - penalty * (others[:, None] + off_pool).abs().amax(dim=0)  # [m]
        gain[taken] = -float("inf")
        best = int(gain.argmax())
        taken[best] = True
        chosen.append(int(pool[best]))
        own, others = own + own_pool[best], others + off_pool[:, best]
    return torch.tensor(chosen, dtype=torch.long)


def carry_specific_order(effect: Tensor, off: Tensor, *, k: int, penalty: float = CARRY_PENALTY,
                         candidates: int = 1000, prefix: Tensor | None = None) -> Tensor:
    """`specific_order` among the neurons that carry the concept (effect < 0: ablating them lowers its
    targets): the others' effects are zeroed, so they are never picked for their own sake. The specific
    ranking of the in-distribution methods (prompt, prompt-atp), where "carries" is what users ask."""
    carrying = torch.where(effect < 0, effect, torch.zeros_like(effect))
    count = int((carrying < 0).sum())  # the pool is the top `candidates` by |effect|: carrying neurons only
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    return specific_order(carrying, off, k=k, penalty=penalty, candidates=min(candidates, count), prefix=prefix)


def measured_carry_order(effect: Tensor, off: Tensor, *, k: int, penalty: float, measured: int) -> Tensor:
    """The prompt ranking after the measured choice (attribution/measured_selection.py): the first
    `measured` neurons of the carry selection at the chosen `penalty` (the set that was measured), then
    the selection continued from them at max(penalty, CARRY_PENALTY). Nothing past the measured set
    was measured, and a low penalty's continuation is generic: royalty's top-50 at penalty 2 measured
    prompt specificity 2.1 where penalty 10's measured 8.8. At the default penalty this is
    `carry_specific_order`."""
    head = carry_specific_order(effect, off, k=min(k, measured), penalty=penalty)
    return carry_specific_order(effect, off, k=k, penalty=max(penalty, CARRY_PENALTY), prefix=head)


def prompt_candidates(estimate: Tensor, off: Tensor, *, top: int, penalty: float = CANDIDATE_PENALTY) -> Tensor:
    """The neurons the prompt method scores exactly for a concept: prompt AtP's top `top` by |estimate|
    (the largest effects) and the first `top` of the carry-specific selection on the estimates (the
    specific neurons, whose own effects are small and would never make the first list). estimate [n],
    off [r, n] -> sorted unique int64 indices."""
    largest = estimate.abs().topk(min(top, estimate.numel())).indices
    specific = carry_specific_order(estimate, off, k=top, penalty=penalty)
    return torch.unique(torch.cat([largest, specific]))


def generic_mask(effects: Tensor, *, top_share: float = 0.01, concept_share: float = GENERIC_SHARE) -> Tensor:
    """[c, n] effects of c concepts -> [n] bool: neurons in the top `top_share` by |effect| of at least
    `concept_share` of the concepts (they move most concepts: not evidence for any one of them)."""
    n = effects.shape[1]
    k = max(1, int(round(top_share * n)))
    top = torch.zeros_like(effects, dtype=torch.bool)
    top.scatter_(1, effects.abs().topk(k, dim=1).indices, True)
    return top.float().mean(dim=0) >= concept_share
