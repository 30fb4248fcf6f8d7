"""Agreement between methods that estimate the same quantity, computed from a run's rows at commit."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import torch

from attribution.stats import spearman


def neg_agreement(rows: pa.Table) -> list[dict]:
    """Per concept: Spearman of NeurGrad's signed value against NEG's swept slope on NEG's sample.

    NeurGrad estimates NEG (seed 002): both are signed, so the signed values are compared, and
    their absolute values (what ranks neurons) too.
    """
    out = []
    for concept in sorted(set(rows.column("concept").to_pylist())):
        of_concept = rows.filter(pc.equal(rows.column("concept"), concept))
        values = {}
        for method in ("neg", "neurgrad"):
            part = of_concept.filter(pc.equal(of_concept.column("method"), method)).select(["layer", "neuron", "effect"])
            values[method] = {(r["layer"], r["neuron"]): r["effect"] for r in part.to_pylist()}
        keys = sorted(set(values["neg"]) & set(values["neurgrad"]))
        if len(keys) < 3:
            continue
        neg = torch.tensor([values["neg"][k] for k in keys])
        grad = torch.tensor([values["neurgrad"][k] for k in keys])
        out.append({"concept": concept, "neurons": len(keys), "spearman_signed": round(spearman(neg, grad), 4),
                    "spearman_abs": round(spearman(neg.abs(), grad.abs()), 4)})
    return out
