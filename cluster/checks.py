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


def bf16_sample(layers: tuple[int, ...], d_mlp: int, count: int, *, seed: str = "bf16") -> tuple[tuple[int, tuple[int, ...]], ...]:
    """A seeded sample of `count` (layer, neuron) pairs over `layers`, as (layer, sorted neurons) per layer."""
    import random

    rng = random.Random(f"{seed}:{d_mlp}:{','.join(map(str, layers))}")
    picks = rng.sample(range(len(layers) * d_mlp), min(count, len(layers) * d_mlp))
    by_layer: dict[int, list[int]] = {}
    for pick in picks:
        by_layer.setdefault(layers[pick // d_mlp], []).append(pick % d_mlp)
    return tuple((layer, tuple(sorted(by_layer[layer]))) for layer in sorted(by_layer))


def bf16_agreement(rows: pa.Table, sample, float32: dict[str, list[float]], *, ablation: str) -> list[dict]:
    """Per concept: Spearman of the bf16 run's scores against the float32 engine's on the sample, the
    share of float32's top-k (k = a tenth of the sample) that bf16 also ranks top-k, and the largest
    absolute difference of effects."""
    keys = [(layer, neuron) for layer, neurons in sample for neuron in neurons]
    neat = rows.filter(pc.and_(pc.equal(rows.column("method"), "neat"), pc.equal(rows.column("ablation"), ablation)))
    out = []
    for concept, exact in sorted(float32.items()):
        part = neat.filter(pc.equal(neat.column("concept"), concept)).select(["layer", "neuron", "effect"])
        bf16 = {(r["layer"], r["neuron"]): r["effect"] for r in part.to_pylist()}
        if not all(key in bf16 for key in keys) or len(keys) < 3:
            continue
        low, high = torch.tensor([bf16[key] for key in keys]), torch.tensor(exact)
        k = max(1, len(keys) // 10)
        top_low = set(low.abs().topk(k).indices.tolist())
        top_high = set(high.abs().topk(k).indices.tolist())
        out.append({"concept": concept, "ablation": ablation, "neurons": len(keys),
                    "spearman": round(spearman(low.abs(), high.abs()), 6), "top_k": k,
                    "top_k_agreement": round(len(top_low & top_high) / k, 4),
                    "max_abs_diff": float((low - high).abs().max())})
    return out
