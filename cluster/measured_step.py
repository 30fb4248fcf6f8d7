"""The run's measured choice of each concept's prompt ranking (attribution/measured_selection.py): after
the exact prompt pass, the driver builds every concept's candidate top-k sets (the carry selection at
several penalties, from the staged rows and the reference contrast), the actors ablate them on real
prompts (concepts dealt round-robin), and the choice sets the penalty of that concept's specific
ranking in the specificity table. The measurements go into the run's metadata.
"""
from __future__ import annotations

import time

from attribution.measured_selection import SetMeasure, candidate_sets, choose_set
from attribution.specificity import MEASURED_K
from cluster.pool import error_line


def measured_choices(actors, contrasts: list, progress=None, *, baseline_layers: list[int] | None = None) -> dict:
    """contrasts: storage/specificity.py PromptContrast of each (concept, ablation) -> {"penalties":
    {(concept, ablation): penalty}, "metadata": {concept: {ablation: what was measured and chosen}},
    "seconds"}. An actor that dies here is left out and its concepts go to the others. With
    baseline_layers (the run's layers), each actor also caches validate's random baseline of its
    concepts (ShardScorer.measure_sets)."""
    import ray
    from ray.exceptions import RayActorError

    started = time.perf_counter()
    todo = [(c, candidate_sets(c.effect, c.others, c.neurons, k=MEASURED_K)) for c in contrasts]
    live = list(actors)
    measured: dict[tuple[str, str], list[SetMeasure]] = {}
    chosen: dict[tuple[str, str], SetMeasure] = {}
    while todo:
        if not live:
            raise RuntimeError("measured choice: every actor died before the candidate sets were measured")
        tasks = [(live[i % len(live)], contrast, sets,
                  live[i % len(live)].measure_sets.remote(contrast.concept, contrast.ablation, sets,
                                                                 baseline_layers))
                 for i, (contrast, sets) in enumerate(todo)]
        todo = []
        for actor, contrast, sets, ref in tasks:
            try:
                key = (contrast.concept, contrast.ablation)
                measured[key] = ray.get(ref)
                best = chosen[key] = choose_set(measured[key])
                if progress is not None:
                    progress.message(f"measured choice [{len(measured)}/{len(contrasts)}]: {contrast.concept} "
                                     f"({contrast.ablation}): penalty {best.penalty:g}, its top-{MEASURED_K} lowers "
                                     f"its gold by {-best.own_change:.3f} nats, {best.specificity:.1f}x the largest "
                                     f"change of a contrast concept")
            except RayActorError as err:
                if actor in live:
                    live.remove(actor)
                    if progress is not None:
                        progress.message(f"measured choice: an actor died ({error_line(err)}); "
                                         f"its concepts go to the {len(live)} other actor(s)")
                todo.append((contrast, sets))
    penalties, metadata = {}, {}
    for (concept, ablation), measures in measured.items():
        best = chosen[(concept, ablation)]
        penalties[(concept, ablation)] = best.penalty
        metadata.setdefault(concept, {})[ablation] = {
            "k": MEASURED_K, "chosen_penalty": best.penalty, "neurons": [list(n) for n in best.neurons],
            "specificity": best.specificity, "own_change": best.own_change,
            "candidates": [{"penalty": m.penalty, "specificity": m.specificity, "own_change": m.own_change,
                            "most_moved": _most_moved(m.other_changes)} for m in measures]}
    return {"penalties": penalties, "metadata": metadata, "seconds": round(time.perf_counter() - started, 2)}


def _most_moved(changes: dict[str, float]) -> str | None:
    return max(changes, key=lambda name: abs(changes[name])) if changes else None
