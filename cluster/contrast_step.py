"""The run's reference-contrast step (README "Concept-specific rankings"): the actors estimate every
neuron's effect on each reference concept with AtP (split between them): on the concept vectors for
the neat and atp rows, on the concepts' cloze prompts for the prompt and prompt-atp rows. After the
run's neurons commit the driver writes the run's specificity table (storage/specificity.py).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from attribution.reference import reference_concepts
from cluster.pool import error_line


def reference_contrast(actors, progress=None, *, vectors: bool = True, prompts: bool = False) -> dict | None:
    """Every reference concept's AtP effects (on the concept vectors, on the prompts or both), the
    concepts dealt round-robin to the actors (Ray handles of ShardScorer); None where the actors cannot
    run AtP. See `merge_reference_parts`.

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
        tasks = [(actor, chunk, actor.reference_effects.remote(chunk, vectors=vectors, prompts=prompts)) for actor, chunk in zip(live, chunks)]
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
    "target_ids", "effects": {mode: [concepts, n_layers, d_mlp]} (concept vectors; {} when not computed),
    "prompt_effects": the same on the prompts, "seconds"}; None if any part is None."""
    if any(part is None for part in parts):
        return None
    order, targets, effects, prompt_effects = [], [], {}, {}
    for part_names, part_targets, on_vectors, on_prompts in parts:
        order += list(part_names)
        targets += [list(t) for t in part_targets]
        for merged, part in ((effects, on_vectors), (prompt_effects, on_prompts)):
            for mode, values in (part or {}).items():
                merged.setdefault(mode, []).append(values)
    position = {name: i for i, name in enumerate(order)}
    index = [position[name] for name in names]  # back to the file's order
    return {"concepts": list(names), "target_ids": [targets[i] for i in index],
            "effects": {mode: np.concatenate(values)[index] for mode, values in effects.items()},
            "prompt_effects": {mode: np.concatenate(values)[index] for mode, values in prompt_effects.items()},
            "seconds": round(seconds, 2)}


def contrast_metadata(contrast: dict | None, reason: str = "") -> dict:
    """What the run's metadata records about its reference contrast."""
    if contrast is None:
        return {"enabled": False, "reason": reason}
    return {"enabled": True, "concepts": contrast["concepts"], "target_ids": contrast["target_ids"],
            "ablations": sorted(contrast["effects"]), "prompt_ablations": sorted(contrast["prompt_effects"]),
            "seconds": contrast["seconds"]}


def specificity_table(rows: pa.Table, contrast: dict, *, run_id: str, model: str, layers: list[int],
                      penalties: dict | None = None) -> pa.Table:
    """The run's specificity rows: neat and atp against the reference concept vectors, prompt and
    prompt-atp against the reference concepts' prompts (the prompt ranking's penalty per (concept,
    ablation) from `penalties`, the run's measured choice, where given)."""
    from storage.specificity import SPECIFIC_METHODS, prompt_specificity_rows, specificity_rows

    rows = rows.select(["concept", "method", "ablation", "layer", "neuron", "effect"])
    mine = rows.filter(pc.is_in(rows["method"], pa.array(SPECIFIC_METHODS)))
    tables = [specificity_rows(mine, contrast["effects"], contrast["concepts"], run_id=run_id, model=model,
                               layers=layers)]
    if contrast.get("prompt_effects"):
        prompt = rows.filter(pc.is_in(rows["method"], pa.array(["prompt-atp", "prompt"])))
        tables.append(prompt_specificity_rows(prompt, contrast["prompt_effects"], contrast["concepts"],
                                              run_id=run_id, model=model, layers=layers, penalties=penalties))
    return pa.concat_tables(tables)
