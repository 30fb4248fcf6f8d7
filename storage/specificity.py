"""The atlas's `specificity` table: per run, concept, method and ablation, every neuron's exact effect
against its largest effect on a contrast concept (the reference set's AtP estimates and the run's
other concepts), its specificity ratio, its rank in the specific ranking (the greedy set selection of
attribution/specificity.py, the first `SPECIFIC_TOP` neurons) and whether it is generic.

neat and atp rows are contrasted on the concept vectors; prompt-atp and prompt rows on the concepts'
prompts, and their specific ranking takes only neurons that carry the concept (ablation lowers its
gold tokens). The prompt method scores a concept's screened neurons only: its rows are those neurons,
contrasted with the reference concepts' and the run's other concepts' prompt AtP.

Written once per run, after the run's neurons commit (its own Delta commit); DuckDB users read it
with `delta_scan('ATLAS/specificity')` or the `specificity` view of `neuron-atlas sql`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from attribution.specificity import (CARRY_PENALTY, MEASURED_K, generic_mask, measured_carry_order, off_target,
                                     specific_order, specificity_ratio)
from storage.errors import AtlasError
from storage.location import delta_options, table_uri
from storage.schema import check_schema, validate_name

SPECIFICITY = "specificity"
SPECIFIC_TOP = 100  # neurons ranked by the greedy selection per concept; the rest have a null rank
RATIO_FLOOR = 0.05  # the ratio's denominator is at least this share of the concept's largest |effect|
SPECIFIC_METHODS = ("neat", "atp")  # the methods whose effects are changes of log p(T), like AtP's
SPECIFICITY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model", pa.string()), ("concept", pa.string()), ("method", pa.string()),
    ("ablation", pa.string()), ("layer", pa.int32()), ("neuron", pa.int32()),
    ("effect", pa.float32()),  # the concept's effect (the run's rows of the method)
    ("off_target", pa.float32()),  # largest |effect| on a contrast concept (reference AtP, run's others)
    ("off_target_concept", pa.string()),  # which one
    ("specificity", pa.float32()),  # |effect| / max(off_target, RATIO_FLOOR * the concept's max |effect|)
    ("specific_rank", pa.int32()),  # 1.. in the specific ranking; null beyond SPECIFIC_TOP
    ("generic", pa.bool_()),  # in the top 1% by |effect| of at least half the concepts (reference + run)
    ("created_at", pa.timestamp("us", tz="UTC")),
])


def specificity_rows(rows: pa.Table, reference: dict[str, np.ndarray], reference_names: list[str], *,
                     run_id: str, model: str, layers: list[int], top: int = SPECIFIC_TOP,
                     methods: tuple[str, ...] = SPECIFIC_METHODS, carry: bool = False) -> pa.Table:
    """The specificity table of one run.

    rows: the run's rows (concept, method, ablation, layer, neuron, effect) of `methods`, the same
    neurons for every concept. reference: ablation -> [reference concepts, n_layers, d_mlp] AtP effects;
    layers: the run's layers (the neurons are those layers' neurons, in order). Methods and ablations
    without a reference (range) are skipped. carry: rank only neurons whose effect is negative.
    """
    out = []
    for method in sorted(set(rows.column("method").to_pylist()) & set(methods)):
        for ablation in sorted(set(rows.column("ablation").to_pylist()) & set(reference)):
            part = rows.filter(pc.and_(pc.equal(rows["method"], method), pc.equal(rows["ablation"], ablation)))
            concepts, layer_col, neuron_col, effects = dense_effects(
                part, what=f"run {run_id}: method {method}, ablation {ablation}")  # effects [concepts, n]
            ref = reference_at(reference[ablation], layer_col, neuron_col)  # [r, n]
            generic = generic_mask(torch.cat([ref, effects])).numpy()  # [n]
            for i, concept in enumerate(concepts):
                others = torch.cat([ref, torch.cat([effects[:i], effects[i + 1:]])])  # [r + run others, n]
                names = list(reference_names) + [c for c in concepts if c != concept]
                out.append(_concept_rows(effects[i], others, names, generic, layer_col, neuron_col, top=top,
                                         carry=carry, keys=(run_id, model, concept, method, ablation)))
    return pa.concat_tables(out) if out else SPECIFICITY_SCHEMA.empty_table()


def prompt_specificity_rows(rows: pa.Table, reference: dict[str, np.ndarray], reference_names: list[str], *,
                            run_id: str, model: str, layers: list[int], top: int = SPECIFIC_TOP,
                            penalties: dict[tuple[str, str], float] | None = None) -> pa.Table:
    """The in-distribution methods' specificity rows: prompt-atp like `specificity_rows` (every neuron,
    every concept) with the carry ranking; prompt on each concept's own screened neurons, its exact
    effects against the reference concepts' and the run's other concepts' prompt AtP at those neurons.
    penalties: (concept, ablation) -> the carry ranking's penalty for the prompt rows (the measured
    choice, attribution/measured_selection.py); CARRY_PENALTY where absent."""
    screen = rows.filter(pc.equal(rows["method"], "prompt-atp"))
    out = [specificity_rows(screen, reference, reference_names, run_id=run_id, model=model, layers=layers,
                            top=top, methods=("prompt-atp",), carry=True)]
    for contrast in prompt_contrasts(rows, reference, reference_names, run_id=run_id):
        penalty = (penalties or {}).get((contrast.concept, contrast.ablation), CARRY_PENALTY)
        out.append(_concept_rows(contrast.effect, contrast.others, contrast.names, contrast.generic,
                                 contrast.layer_col, contrast.neuron_col, top=top, carry=True, penalty=penalty,
                                 keys=(run_id, model, contrast.concept, "prompt", contrast.ablation)))
    return pa.concat_tables(out)


@dataclass(frozen=True)
class PromptContrast:
    """One concept's prompt rows (its screened neurons) against the contrast concepts' prompt AtP."""

    concept: str
    ablation: str
    effect: torch.Tensor  # [n] the concept's exact prompt effects
    others: torch.Tensor  # [contrast concepts, n] the reference's and the run's other concepts' prompt AtP
    names: list[str]  # the contrast concepts, in `others` order
    generic: np.ndarray  # [n] bool
    layer_col: np.ndarray  # [n] int64
    neuron_col: np.ndarray  # [n] int64

    @property
    def neurons(self) -> list[tuple[int, int]]:
        return [(int(layer), int(neuron)) for layer, neuron in zip(self.layer_col, self.neuron_col)]


def prompt_contrasts(rows: pa.Table, reference: dict[str, np.ndarray], reference_names: list[str], *,
                     run_id: str) -> list[PromptContrast]:
    """Per concept and ablation of the run's prompt rows: what its specific ranking is selected from."""
    screen = rows.filter(pc.equal(rows["method"], "prompt-atp"))
    exact = rows.filter(pc.equal(rows["method"], "prompt"))
    out = []
    for ablation in sorted(set(exact.column("ablation").to_pylist()) & set(reference)):
        # [concepts, n]: every neuron of the run's layers
        concepts, atp_layer, atp_neuron, atp_effects = dense_effects(
            screen.filter(pc.equal(screen["ablation"], ablation)),
            what=f"run {run_id}: method prompt-atp, ablation {ablation}")
        position = {key: j for j, key in enumerate(zip(atp_layer.tolist(), atp_neuron.tolist()))}
        ref_all = reference_at(reference[ablation], atp_layer, atp_neuron)  # [r, n]
        generic_all = generic_mask(torch.cat([ref_all, atp_effects])).numpy()
        mine = exact.filter(pc.equal(exact["ablation"], ablation))
        for concept in sorted(set(mine.column("concept").to_pylist())):
            part = mine.filter(pc.equal(mine["concept"], concept))
            part = part.sort_by([("layer", "ascending"), ("neuron", "ascending")])
            layer_col, neuron_col = _neuron_columns(part)
            at = torch.tensor([position[key] for key in zip(layer_col.tolist(), neuron_col.tolist())], dtype=torch.long)
            others = torch.cat([ref_all[:, at], atp_effects[[i for i, c in enumerate(concepts) if c != concept]][:, at]])
            names = list(reference_names) + [c for c in concepts if c != concept]
            out.append(PromptContrast(concept, ablation, _effects(part), others, names, generic_all[at.numpy()],
                                      layer_col, neuron_col))
    return out


def _neuron_columns(part: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    # Arrow's zero-copy arrays are read-only; torch warns on those, so index with int64 copies.
    return (part.column("layer").to_numpy().astype(np.int64), part.column("neuron").to_numpy().astype(np.int64))


def _effects(part: pa.Table) -> torch.Tensor:  # [rows] float32
    return torch.from_numpy(part.column("effect").to_numpy(zero_copy_only=False).astype(np.float32))


def dense_effects(part: pa.Table, *, what: str) -> tuple[list[str], np.ndarray, np.ndarray, torch.Tensor]:
    """Rows (concept, layer, neuron, effect) holding the same neurons for every concept -> (concepts,
    layer [n], neuron [n], effects [concepts, n]), ordered by concept, then (layer, neuron)."""
    part = part.sort_by([("concept", "ascending"), ("layer", "ascending"), ("neuron", "ascending")])
    concepts = sorted(set(part.column("concept").to_pylist()))
    n = part.num_rows // max(1, len(concepts))
    if n * len(concepts) != part.num_rows:
        raise AtlasError(f"{what} does not hold the same neurons for every concept "
                         f"({part.num_rows} rows, {len(concepts)} concepts)")
    layer_col, neuron_col = _neuron_columns(part.slice(0, n))
    return concepts, layer_col, neuron_col, _effects(part).reshape(len(concepts), n)


def reference_at(reference: np.ndarray, layer_col: np.ndarray, neuron_col: np.ndarray) -> torch.Tensor:
    """[r, n_layers, d_mlp] -> [r, n]: the reference effects of the listed neurons (a copy)."""
    ref = torch.from_numpy(np.array(reference, dtype=np.float32))
    return ref[:, torch.from_numpy(layer_col), torch.from_numpy(neuron_col)]


def _concept_rows(effect: torch.Tensor, others: torch.Tensor, names: list[str], generic: np.ndarray,
                  layer_col: np.ndarray, neuron_col: np.ndarray, *, top: int, carry: bool, keys: tuple,
                  penalty: float = CARRY_PENALTY) -> pa.Table:
    """SPECIFICITY_SCHEMA rows of one concept, method and ablation: effect [n], others [contrast, n]."""
    run_id, model, concept, method, ablation = keys
    n = len(effect)
    worst, which = off_target(others)
    floor = RATIO_FLOOR * float(effect.abs().max()) if n else 0.0
    ratio = specificity_ratio(effect, others, floor=max(floor, 1e-12))
    if not carry:
        order = specific_order(effect, others, k=top)
    else:  # the measured choice's set first (its penalty), then the continuation (attribution/specificity.py)
        order = measured_carry_order(effect, others, k=top, penalty=penalty, measured=MEASURED_K)
    ranks = np.full(n, -1, dtype=np.int32)
    ranks[order.numpy()] = np.arange(1, len(order) + 1, dtype=np.int32)
    now = datetime.now(timezone.utc)
    return pa.table({
        "run_id": pa.array([run_id] * n, pa.string()), "model": pa.array([model] * n, pa.string()),
        "concept": pa.array([concept] * n, pa.string()), "method": pa.array([method] * n, pa.string()),
        "ablation": pa.array([ablation] * n, pa.string()),
        "layer": pa.array(layer_col.astype(np.int32)), "neuron": pa.array(neuron_col.astype(np.int32)),
        "effect": pa.array(effect.numpy()), "off_target": pa.array(worst.numpy()),
        "off_target_concept": pa.array(np.array(names, dtype=object)[which.numpy()], pa.string()),
        "specificity": pa.array(ratio.numpy().astype(np.float32)),
        "specific_rank": pa.array(ranks, mask=ranks < 0),
        "generic": pa.array(generic.astype(bool)),
        "created_at": pa.array([now] * n, type=pa.timestamp("us", tz="UTC")),
    }, schema=SPECIFICITY_SCHEMA)


def write_specificity(atlas_uri: str | os.PathLike, table: pa.Table, *, storage_options: dict | None = None) -> int:
    """Append one run's specificity rows as one commit; returns the table version."""
    check_schema(table, SPECIFICITY_SCHEMA, what="specificity rows")
    for name in ("run_id", "model", "concept"):
        for value in set(table.column(name).to_pylist()):
            validate_name("run" if name == "run_id" else name, value)
    uri = table_uri(atlas_uri, SPECIFICITY)
    write_deltalake(uri, table, mode="append", storage_options=delta_options(storage_options))
    return DeltaTable(uri, storage_options=delta_options(storage_options)).version()


def _open(atlas_uri, storage_options) -> DeltaTable | None:
    try:
        return DeltaTable(table_uri(atlas_uri, SPECIFICITY), storage_options=delta_options(storage_options))
    except TableNotFoundError:
        return None


def has_specificity(atlas_uri, *, run_id: str, method: str, storage_options: dict | None = None) -> bool:
    """Does the run hold the specific ranking for the method (a run with the reference contrast)?"""
    table = _open(atlas_uri, storage_options)
    if table is None:
        return False
    import pyarrow.dataset as pds

    found = table.to_pyarrow_dataset().head(1, columns=["run_id"], filter=(pds.field("run_id") == run_id)
                                               & (pds.field("method") == method))
    return found.num_rows > 0


def specific_neurons(atlas_uri, *, run_id: str, concept: str, method: str = "neat", ablation: str | None = None,
                     top: int = 20, storage_options: dict | None = None) -> pa.Table:
    """The concept's specific ranking in a run: rows sorted by specific_rank (per ablation), the first `top`."""
    import pyarrow.dataset as pds

    table = _open(atlas_uri, storage_options)
    if table is None:
        raise AtlasError(f"atlas {atlas_uri} has no specificity table: its runs ran without the reference contrast")
    where = ((pds.field("run_id") == run_id) & (pds.field("concept") == concept) & (pds.field("method") == method)
             & pds.field("specific_rank").is_valid() & (pds.field("specific_rank") <= top))
    if ablation is not None:
        where = where & (pds.field("ablation") == ablation)
    rows = table.to_pyarrow_dataset().to_table(filter=where)
    if not rows.num_rows:
        raise AtlasError(f"run {run_id} has no specific ranking of concept {concept!r} (method {method}"
                         f"{', ablation ' + ablation if ablation else ''})")
    return rows.sort_by([("ablation", "ascending"), ("specific_rank", "ascending")])


def generic_neurons(atlas_uri, *, run_id: str, method: str = "neat", ablation: str | None = None,
                    storage_options: dict | None = None) -> pa.Table:
    """The run's generic neurons (layer, neuron, ablation): large effects on most concepts."""
    import pyarrow.dataset as pds

    table = _open(atlas_uri, storage_options)
    if table is None:
        return pa.table({"ablation": [], "layer": [], "neuron": []})
    where = ((pds.field("run_id") == run_id) & (pds.field("method") == method)
             & (pds.field("generic") == True))  # noqa: E712
    if ablation is not None:
        where = where & (pds.field("ablation") == ablation)
    rows = table.to_pyarrow_dataset().to_table(columns=["ablation", "layer", "neuron", "concept"], filter=where)
    return rows.group_by(["ablation", "layer", "neuron"]).aggregate([]).sort_by(
        [("ablation", "ascending"), ("layer", "ascending"), ("neuron", "ascending")])


def register_view(con, atlas_uri, storage_options: dict | None = None, *, run_id: str | None = None,
                  as_of=None) -> None:
    """The view `specificity` on a DuckDB connection: the table's rows, or none (SPECIFICITY_SCHEMA)
    when the atlas has no such table. With `as_of` a time, the table as it was then; a version number
    counts the neurons table's versions, so with one the view is empty."""
    from datetime import datetime

    from storage.read import _open as open_table, parse_as_of

    source = SPECIFICITY_SCHEMA.empty_table()
    moment = parse_as_of(as_of)
    if moment is None or isinstance(moment, datetime):
        try:
            table = open_table(atlas_uri, SPECIFICITY, storage_options, as_of=moment)
        except AtlasError:  # the table did not exist yet at that time
            table = None
        if table is not None:
            source = table.to_pyarrow_dataset()
    con.register("atlas_specificity", source)
    where = f" WHERE run_id = '{run_id}'" if run_id is not None else ""  # a validated slug
    con.execute(f"CREATE VIEW specificity AS SELECT * FROM atlas_specificity{where}")
