"""Concept-specific rankings from a committed run: a neuron that ranks high for every concept is not
a concept neuron (docs/design.md, "Methods"). Pure Arrow/NumPy over the run's rows; no model needed.

contrastive_score(neuron, c) = score(neuron, c) - max over the run's other concepts c' of score(neuron, c')
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from storage.errors import AtlasError
from storage.read import open_neurons, top_neurons

CONTRAST_COLUMNS = ["concept", "ablation", "layer", "neuron", "score", "effect", "activation", "rank",
                    "contrastive_score", "contrastive_rank", "closest_concept", "closest_score"]


def _run_rows(atlas_uri, *, model: str, method: str, run_id: str, storage_options=None) -> pa.Table:
    data = open_neurons(atlas_uri, storage_options).to_pyarrow_dataset()
    where = (pds.field("model") == model) & (pds.field("method") == method) & (pds.field("run_id") == run_id)
    return data.to_table(columns=["concept", "ablation", "layer", "neuron", "score", "effect", "activation", "rank"],
                         filter=where)


def contrastive_table(rows: pa.Table, concept: str) -> pa.Table:
    """Every neuron of `concept` in `rows` (one run, one method) with its contrastive score and rank.

    Rows must hold at least two concepts; per ablation, the neuron's score for `concept` minus its
    highest score for any other concept; rank 1 = most concept-specific.
    """
    concepts = sorted(set(rows.column("concept").to_pylist()))
    if concept not in concepts or len(concepts) < 2:
        raise AtlasError(f"a contrastive ranking of {concept!r} needs a run with it and other concepts; "
                         f"this run has {concepts}")
    out = []
    for ablation in sorted(set(rows.column("ablation").to_pylist())):
        part = rows.filter(pc.equal(rows.column("ablation"), ablation))
        part = part.sort_by([("concept", "ascending"), ("layer", "ascending"), ("neuron", "ascending")])
        n = part.num_rows // len(concepts)
        scores = part.column("score").to_numpy().reshape(len(concepts), n)  # [concepts, neurons], same order
        mine = concepts.index(concept)
        others = np.delete(scores, mine, axis=0)
        closest = others.argmax(axis=0)
        contrast = scores[mine] - others[closest, np.arange(n)]
        order = np.argsort(-contrast, kind="stable")
        ranks = np.empty(n, dtype=np.int32)
        ranks[order] = np.arange(1, n + 1, dtype=np.int32)
        other_names = np.array([c for c in concepts if c != concept])
        own = part.slice(mine * n, n)
        table = own.append_column("contrastive_score", pa.array(contrast.astype(np.float32)))
        table = table.append_column("contrastive_rank", pa.array(ranks))
        table = table.append_column("closest_concept", pa.array(other_names[closest]))
        table = table.append_column("closest_score", pa.array(others[closest, np.arange(n)].astype(np.float32)))
        out.append(table.take(order))
    return pa.concat_tables(out).select(CONTRAST_COLUMNS)


def generic_neurons(rows: pa.Table, *, k: int = 100) -> pa.Table:
    """Neurons in the top-k of every concept of the run (per ablation): layer, neuron, worst rank."""
    concepts = set(rows.column("concept").to_pylist())
    top = rows.filter(pc.less_equal(rows.column("rank"), k))
    grouped = top.group_by(["ablation", "layer", "neuron"]).aggregate([("concept", "count_distinct"), ("rank", "max")])
    every = grouped.filter(pc.equal(grouped.column("concept_count_distinct"), len(concepts)))
    return every.select(["ablation", "layer", "neuron", "rank_max"]).rename_columns(
        ["ablation", "layer", "neuron", "worst_rank"]).sort_by([("ablation", "ascending"), ("worst_rank", "ascending")])


def contrastive_neurons(atlas_uri: str | os.PathLike, *, concept: str, model: str | None = None,
                        method: str = "neat", ablation: str | None = None, run_id: str | None = None,
                        top: int = 20, generic_k: int = 100, storage_options: dict | None = None
                        ) -> tuple[pa.Table, pa.Table, dict]:
    """(top rows by contrastive rank, the run's generic neurons, {model, run_id, method}) for a concept."""
    if method == "prompt":  # each concept's own candidates: no neuron has a score for every concept
        raise AtlasError("the contrastive ranking compares a neuron's scores across the run's concepts, and method "
                         "prompt scores each concept's own candidates only; its specific ranking (the default) "
                         "contrasts them with the other concepts' prompt-atp estimates, or use --method prompt-atp")
    head = top_neurons(atlas_uri, concept=concept, model=model, method=method, ablation=ablation, run_id=run_id,
                       top=1, storage_options=storage_options)
    info = {"model": head.column("model")[0].as_py(), "run_id": head.column("run_id")[0].as_py(), "method": method}
    rows = _run_rows(atlas_uri, storage_options=storage_options, **info)
    if ablation is not None:
        rows = rows.filter(pc.equal(rows.column("ablation"), ablation))
    table = contrastive_table(rows, concept)
    table = table.filter(pc.less_equal(table.column("contrastive_rank"), top))
    return table, generic_neurons(rows, k=generic_k), info
