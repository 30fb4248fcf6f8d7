"""The run's reference-contrast step (README "Concept-specific rankings"): the actors estimate every
neuron's effect on each reference concept with AtP (split between them), and after the run's neurons
commit the driver writes the run's specificity table (storage/specificity.py).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from attribution.reference import reference_concepts
from cluster.pool import error_line


def reference_contrast(actors, progress=None) -> dict | None:
    """Every reference concept's AtP effects, the concepts dealt round-robin to the actors (Ray handles
    of ShardScorer); None where the actors cannot run AtP. See `merge_reference_parts`.

    An actor that dies here (its node lost after the shards were scored) is left out and its concepts
    are dealt again to the others; only when none is left does the step fail."""
    import ray
    from ray.exceptions import RayActorError

    started = time.perf_counter()
    names = [c.name for c in reference_concepts()]
    live = list(actors)
    todo = [names[i::len(live)] for i in range(len(live))]
    parts = []
    while todo:
        if not live:
            raise RuntimeError("reference contrast: every actor died before the reference concepts were scored")
        chunks = [sum(todo[i::len(live)], []) for i in range(min(len(live), len(todo)))]
        tasks = [(actor, chunk, actor.reference_effects.remote(chunk)) for actor, chunk in zip(live, chunks)]
        todo = []
        for actor, chunk, ref in tasks:
            try:
                parts.append(ray.get(ref))
            except RayActorError as err:
                live.remove(actor)
                todo.append(chunk)
                if progress is not None:
                    progress.message(f"reference contrast: an actor died ({error_line(err)}); "
                                     f"its concepts go to the {len(live)} other actor(s)")
    return merge_reference_parts(names, parts, seconds=time.perf_counter() - started)


def merge_reference_parts(names: list[str], parts: list, *, seconds: float = 0.0) -> dict | None:
    """ShardScorer.reference_effects results of disjoint name subsets -> {"concepts" (in `names` order),
    "target_ids", "effects": {mode: [concepts, n_layers, d_mlp]}, "seconds"}; None if any part is None."""
    if any(part is None for part in parts):
        return None
    order, targets, effects = [], [], {}
    for part_names, part_targets, part_effects in parts:
        order += list(part_names)
        targets += [list(t) for t in part_targets]
        for mode, values in part_effects.items():
            effects.setdefault(mode, []).append(values)
    position = {name: i for i, name in enumerate(order)}
    index = [position[name] for name in names]  # back to the file's order
    return {"concepts": list(names), "target_ids": [targets[i] for i in index],
            "effects": {mode: np.concatenate(values)[index] for mode, values in effects.items()},
            "seconds": round(seconds, 2)}


def contrast_metadata(contrast: dict | None, reason: str = "") -> dict:
    """What the run's metadata records about its reference contrast."""
    if contrast is None:
        return {"enabled": False, "reason": reason}
    return {"enabled": True, "concepts": contrast["concepts"], "target_ids": contrast["target_ids"],
            "ablations": sorted(contrast["effects"]), "seconds": contrast["seconds"]}


def specificity_table(rows: pa.Table, contrast: dict, *, run_id: str, model: str, layers: list[int]) -> pa.Table:
    from storage.specificity import SPECIFIC_METHODS, specificity_rows

    mine = rows.filter(pc.is_in(rows["method"], pa.array(SPECIFIC_METHODS)))
    mine = mine.select(["concept", "method", "ablation", "layer", "neuron", "effect"])
    return specificity_rows(mine, contrast["effects"], contrast["concepts"], run_id=run_id, model=model,
                            layers=layers)
