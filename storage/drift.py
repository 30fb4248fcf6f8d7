"""Drift between a run and the previous run of its model family: per concept, method and ablation,
the top-k neurons entering and leaving, the Spearman of the rankings and the largest movers (computed
by `Atlas.diff`), stored once per run in the atlas's `drift` Delta table beside `neurons` and `runs`.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.transaction import CommitProperties, Transaction

from storage.errors import AtlasError
from storage.location import delta_options, normalize_uri, table_uri
from storage.schema import validate_name

DRIFT = "drift"
DRIFT_APP = "neuron-atlas-drift"
DRIFT_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("previous_run_id", pa.string()),
        ("family", pa.string()),  # runs of one family are compared (the schedule's name, else the model)
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("previous_model", pa.string()),
        ("previous_revision", pa.string()),
        ("concept", pa.string()),
        ("method", pa.string()),
        ("ablation", pa.string()),
        ("k", pa.int32()),
        ("kept", pa.int32()),  # in both top-k lists
        ("entered", pa.int32()),  # in this run's top-k, not in the previous one's
        ("left", pa.int32()),  # in the previous top-k, not in this run's
        ("churn", pa.float64()),  # left / (kept + left): share of the previous top-k that is gone
        ("spearman", pa.float64()),  # over every neuron ranked in both runs; null below 2 neurons
        ("neurons", pa.int64()),
        ("movers_json", pa.string()),  # [{layer, neuron, rank_a, rank_b, rank_change, score_a, score_b}], largest first
        ("entered_json", pa.string()),  # [[layer, neuron], ...] by rank in this run
        ("left_json", pa.string()),  # [[layer, neuron], ...] by rank in the previous run
        ("drifted", pa.bool_()),
        ("reason", pa.string()),  # which threshold was crossed, e.g. churn:0.350>0.200 ("" if none)
        ("max_churn", pa.float64()),  # the thresholds it was judged by (null: not checked)
        ("min_spearman", pa.float64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
ALERT_PREFIX = "neuron-atlas DRIFT"


def drift_app(run_id: str) -> str:
    return f"{DRIFT_APP}:{run_id}"


def _open(uri: str, storage_options: dict | None) -> DeltaTable | None:
    try:
        return DeltaTable(table_uri(uri, DRIFT), storage_options=delta_options(storage_options))
    except TableNotFoundError:
        return None
    except (DeltaError, OSError) as e:
        raise AtlasError(f"cannot read the atlas table {table_uri(uri, DRIFT)}: {e}") from e


def drift_recorded(atlas_uri: str | os.PathLike, run_id: str, storage_options: dict | None = None) -> bool:
    dt = _open(normalize_uri(atlas_uri), storage_options)
    return dt is not None and dt.transaction_version(drift_app(run_id)) is not None


def run_family(meta: dict, model: str) -> str:
    """A committed run's family: from its fingerprint (runs since fingerprints exist), else its model."""
    return (meta.get("fingerprint") or {}).get("family") or model


def previous_runs(runs: pa.Table, run_id: str) -> list[dict]:
    """Runs of `run_id`'s family committed before it, newest first (rows of the `runs` table with
    `meta` = their metadata)."""
    rows = runs.to_pylist()
    for row in rows:
        row["meta"] = json.loads(row["metadata_json"] or "{}")
        row["family"] = run_family(row["meta"], row["model"])
    this = next((r for r in rows if r["run_id"] == run_id), None)
    if this is None:
        raise AtlasError(f"run {run_id!r} is not committed in the atlas: no drift to compute")
    earlier = [r for r in rows if r["family"] == this["family"] and r["neurons_version"] < this["neurons_version"]]
    return [this] + sorted(earlier, key=lambda r: r["neurons_version"], reverse=True)


def _judge(churn: float, spearman: float | None, max_churn: float | None, min_spearman: float | None) -> str:
    reasons = []
    if max_churn is not None and churn > max_churn:
        reasons.append(f"churn:{churn:.3f}>{max_churn:.3f}")
    if min_spearman is not None and (spearman is None or spearman < min_spearman):
        shown = "nan" if spearman is None else f"{spearman:.4f}"
        reasons.append(f"spearman:{shown}<{min_spearman:.4f}")
    return ",".join(reasons)


def compute_drift(
    atlas_uri: str | os.PathLike,
    run_id: str,
    *,
    k: int = 100,
    max_churn: float | None = None,
    min_spearman: float | None = None,
    movers: int = 10,
    storage_options: dict | None = None,
) -> pa.Table:
    """DRIFT_SCHEMA rows comparing `run_id` with the newest earlier run of its family that holds the
    same (concept, method, ablation); no row for a block without such a run (a family's first run)."""
    from storage.atlas import Atlas
    from storage.read import list_runs

    validate_name("run", run_id)
    uri = normalize_uri(atlas_uri)
    chain = previous_runs(list_runs(uri, storage_options), run_id)
    this, earlier = chain[0], chain[1:]
    atlas = Atlas.open(uri, storage_options)
    ids = [r["run_id"] for r in chain]
    heads = atlas.dataset().to_table(columns=["run_id", "concept", "method", "ablation"],
                                     filter=(pds.field("rank") == 1) & pds.field("run_id").isin(ids))
    blocks: dict[str, set] = {}
    for h in heads.to_pylist():
        blocks.setdefault(h["run_id"], set()).add((h["concept"], h["method"], h["ablation"]))
    created = datetime.now(timezone.utc)
    rows = []
    for concept, method, ablation in sorted(blocks.get(run_id, ())):
        previous = next((r for r in earlier if (concept, method, ablation) in blocks.get(r["run_id"], ())), None)
        if previous is None:
            continue
        diff = atlas.diff(previous["run_id"], run_id, concept, k=k, method=method, ablation=ablation)
        left, kept = diff.left.num_rows, diff.kept
        churn = left / (kept + left) if kept + left else 0.0
        spearman = None if math.isnan(diff.spearman) else diff.spearman
        reason = _judge(churn, spearman, max_churn, min_spearman)
        moved = diff.movers.slice(0, movers).to_pylist() if diff.movers is not None else []
        rows.append({
            "run_id": run_id, "previous_run_id": previous["run_id"], "family": this["family"],
            "model": this["model"], "model_revision": this["model_revision"],
            "previous_model": previous["model"], "previous_revision": previous["model_revision"],
            "concept": concept, "method": method, "ablation": ablation, "k": k, "kept": kept,
            "entered": diff.entered.num_rows, "left": left, "churn": churn, "spearman": spearman,
            "neurons": diff.neurons, "movers_json": json.dumps(moved),
            "entered_json": json.dumps([[r["layer"], r["neuron"]] for r in diff.entered.select(["layer", "neuron"]).to_pylist()]),
            "left_json": json.dumps([[r["layer"], r["neuron"]] for r in diff.left.select(["layer", "neuron"]).to_pylist()]),
            "drifted": bool(reason), "reason": reason, "max_churn": max_churn, "min_spearman": min_spearman,
            "created_at": created,
        })
    return pa.Table.from_pylist(rows, schema=DRIFT_SCHEMA)


def commit_drift(atlas_uri: str | os.PathLike, rows: pa.Table, *, run_id: str,
                 storage_options: dict | None = None) -> bool:
    """Append a run's drift rows as one commit tagged with the run (at most once per run: a second
    writer, e.g. a scheduler catching up while the driver writes, finds it recorded). True if written now."""
    validate_name("run", run_id)
    if rows.num_rows == 0:
        return False
    uri = table_uri(normalize_uri(atlas_uri), DRIFT)
    options = delta_options(storage_options)
    app = drift_app(run_id)
    try:
        DeltaTable.create(uri, DRIFT_SCHEMA, mode="ignore", storage_options=options,
                          commit_properties=CommitProperties(max_commit_retries=0))
    except DeltaError:
        pass  # another writer created it first; opening it below says if not
    for attempt in range(8):
        if attempt:
            time.sleep(random.uniform(0, 0.05 * attempt))
        try:
            dt = DeltaTable(uri, storage_options=options)
            if dt.transaction_version(app) is not None:
                return False
            props = CommitProperties(app_transactions=[Transaction(app, dt.version() + 1)], max_commit_retries=0)
            write_deltalake(dt, rows.cast(DRIFT_SCHEMA), mode="append", commit_properties=props)
            return True
        except CommitFailedError:
            continue  # another writer took the version (maybe this run's drift): re-read the log
        except (DeltaError, OSError) as e:
            raise AtlasError(f"cannot commit the drift of run {run_id!r} to {uri}: {e}") from e
    raise AtlasError(f"cannot commit the drift of run {run_id!r} to {uri}: 8 attempts lost to concurrent commits")


def read_drift(atlas_uri: str | os.PathLike, storage_options: dict | None = None, *, model: str | None = None,
               since: datetime | None = None, run_id: str | None = None) -> pa.Table:
    """Drift rows, newest first; `model` matches the model or the family; `since` the time they were recorded."""
    dt = _open(normalize_uri(atlas_uri), storage_options)
    if dt is None:
        return DRIFT_SCHEMA.empty_table()
    table = dt.to_pyarrow_dataset().to_table()
    if model is not None:
        table = table.filter(pc.or_(pc.equal(table.column("model"), model), pc.equal(table.column("family"), model)))
    if run_id is not None:
        table = table.filter(pc.equal(table.column("run_id"), run_id))
    if since is not None:
        since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
        table = table.filter(pc.greater_equal(table.column("created_at"), pa.scalar(since, DRIFT_SCHEMA.field("created_at").type)))
    order = [("created_at", "descending"), ("run_id", "ascending"), ("concept", "ascending"),
             ("method", "ascending"), ("ablation", "ascending")]
    return table.sort_by(order).select(DRIFT_SCHEMA.names)


def drift_table(atlas_uri: str | os.PathLike, storage_options: dict | None = None):
    """The `drift` rows as an Arrow dataset for SQL views (an empty table if none were recorded)."""
    dt = _open(normalize_uri(atlas_uri), storage_options)
    return dt.to_pyarrow_dataset() if dt is not None else DRIFT_SCHEMA.empty_table()


def alert_line(row: dict) -> str:
    """One line per drifted block, for log-based alerting (README "Nightly re-attribution"):
    neuron-atlas DRIFT run=R previous=P family=F model=M concept=C method=M ablation=A k=K churn=X spearman=Y reason=..."""
    spearman = "nan" if row["spearman"] is None else f"{row['spearman']:.4f}"
    return (f"{ALERT_PREFIX} run={row['run_id']} previous={row['previous_run_id']} family={row['family']} "
            f"model={row['model']} concept={row['concept']} method={row['method']} ablation={row['ablation']} "
            f"k={row['k']} churn={row['churn']:.3f} spearman={spearman} reason={row['reason']}")


def summary_line(row: dict) -> str:
    spearman = "nan" if row["spearman"] is None else f"{row['spearman']:.4f}"
    return (f"drift of run {row['run_id']} from {row['previous_run_id']} ({row['family']}), concept {row['concept']}, "
            f"{row['method']}/{row['ablation']}: top-{row['k']} {row['kept']} kept, {row['entered']} entered, "
            f"{row['left']} left (churn {row['churn']:.3f}); Spearman {spearman} over {row['neurons']:,} neurons"
            + (f"; DRIFTED ({row['reason']})" if row["drifted"] else ""))


def stored_drift(atlas_uri: str | os.PathLike, run_id: str, concept: str, *, method: str = "neat",
                 ablation: str | None = None, previous: str | None = None,
                 storage_options: dict | None = None) -> dict | None:
    """The drift row recorded for a run's concept block (against `previous`, if given), or None."""
    validate_name("run", run_id)
    rows = [r for r in read_drift(atlas_uri, storage_options, run_id=run_id).to_pylist()
            if r["concept"] == concept and r["method"] == method and (ablation is None or r["ablation"] == ablation)
            and (previous is None or r["previous_run_id"] == previous)]
    return rows[0] if len(rows) == 1 else None
