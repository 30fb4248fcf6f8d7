"""Read the atlas through the Delta log only: top neurons of a concept, the runs, read-only SQL.

Never list the table directories: staged and uncommitted Parquet files can sit there.
"""
from __future__ import annotations

import json
import os

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from storage.errors import AmbiguousModelError, AtlasError, UnknownConceptError
from storage.location import NEURONS, RUNS, delta_options, normalize_uri, table_uri
from storage.schema import ATLAS_SCHEMA, RUNS_SCHEMA, validate_name


def _open(uri: str, name: str, storage_options: dict | None) -> DeltaTable | None:
    try:
        return DeltaTable(table_uri(uri, name), storage_options=delta_options(storage_options))
    except TableNotFoundError:
        return None


def open_neurons(atlas_uri: str | os.PathLike, storage_options: dict | None = None) -> DeltaTable | None:
    """The `neurons` Delta table at its latest version, or None when the atlas has none yet."""
    return _open(normalize_uri(atlas_uri), NEURONS, storage_options)


def _latest(heads: pa.Table) -> str:
    """The run with the newest created_at (ties: the greater run id), as the `latest` view picks it."""
    order = heads.sort_by([("created_at", "descending"), ("run_id", "descending")])
    return order.column("run_id")[0].as_py()


def top_neurons(
    atlas_uri: str | os.PathLike,
    *,
    concept: str,
    model: str | None = None,
    method: str = "neat",
    ablation: str | None = None,
    run_id: str | None = None,
    top: int = 20,
    storage_options: dict | None = None,
) -> pa.Table:
    """The `top` highest-ranked neurons of a concept (ATLAS_SCHEMA rows, by ablation then rank).

    By default from the latest run (newest created_at) holding the concept for this model, method
    and, if given, ablation; `ablation=None` returns every ablation of that run.
    """
    if not isinstance(top, int) or top < 1:
        raise AtlasError(f"top {top!r} must be a positive integer")
    uri = normalize_uri(atlas_uri)
    dt = open_neurons(uri, storage_options)
    if dt is None:
        raise UnknownConceptError(
            f"concept {concept!r} is not in the atlas at {uri}: it has no committed runs yet", available=[]
        )
    parts = dt.partitions()  # [{"model": ..., "concept": ...}] from the log, no data read
    if model is not None:
        models = sorted({p["model"] for p in parts})
        if model not in models:
            raise AtlasError(f"model {model!r} is not in the atlas at {uri}; models: {models}")
        parts = [p for p in parts if p["model"] == model]
    available = sorted({p["concept"] for p in parts})
    if concept not in available:
        scope = f" for model {model!r}" if model is not None else ""
        raise UnknownConceptError(
            f"concept {concept!r} is not in the atlas at {uri}{scope}; available concepts: {', '.join(available)}",
            available=available,
        )
    if model is None:
        models = sorted({p["model"] for p in parts if p["concept"] == concept})
        if len(models) > 1:
            raise AmbiguousModelError(
                f"concept {concept!r} is in the atlas for several models: {', '.join(models)}; name one with model=...",
                models=models,
            )
        model = models[0]

    data = dt.to_pyarrow_dataset()
    where = (pds.field("model") == model) & (pds.field("concept") == concept)
    what = f"concept {concept!r} of model {model!r}"
    # Rank-1 rows: one per (run, method, ablation), so the runs on offer cost a tiny read.
    heads = data.to_table(
        columns=["run_id", "method", "ablation", "created_at"], filter=where & (pds.field("rank") == 1)
    )
    held = heads.filter(pc.equal(heads.column("method"), method))
    if held.num_rows == 0:
        methods = sorted(set(heads.column("method").to_pylist()))
        raise AtlasError(f"method {method!r} has no rows for {what}; methods: {methods}")
    what += f", method {method!r}"
    if ablation is not None:
        ablations = sorted(set(held.column("ablation").to_pylist()))
        held = held.filter(pc.equal(held.column("ablation"), ablation))
        if held.num_rows == 0:
            raise AtlasError(f"ablation {ablation!r} has no rows for {what}; ablations: {ablations}")
        what += f", ablation {ablation!r}"
        where &= pds.field("ablation") == ablation
    if run_id is None:
        run_id = _latest(held)
    else:
        validate_name("run", run_id)
        runs = sorted(set(held.column("run_id").to_pylist()))
        if run_id not in runs:
            raise AtlasError(f"run {run_id!r} has no rows for {what}; runs that do: {runs}")
    where &= (pds.field("method") == method) & (pds.field("run_id") == run_id)
    rows = data.to_table(filter=where & (pds.field("rank") <= top))
    rows = rows.sort_by([("ablation", "ascending"), ("rank", "ascending")])
    return rows.select(ATLAS_SCHEMA.names).cast(ATLAS_SCHEMA)


def list_runs(atlas_uri: str | os.PathLike, storage_options: dict | None = None) -> pa.Table:
    """The `runs` table (RUNS_SCHEMA), newest commit first; empty when the atlas has no runs."""
    dt = _open(normalize_uri(atlas_uri), RUNS, storage_options)
    if dt is None:
        return RUNS_SCHEMA.empty_table()
    runs = dt.to_pyarrow_dataset().to_table()
    return runs.sort_by([("neurons_version", "descending")]).select(RUNS_SCHEMA.names).cast(RUNS_SCHEMA)


def run_metadata(atlas_uri: str | os.PathLike, run_id: str, storage_options: dict | None = None) -> dict:
    """The metadata dict a run was committed with."""
    validate_name("run", run_id)
    runs = list_runs(atlas_uri, storage_options)
    found = runs.filter(pc.equal(runs.column("run_id"), run_id))
    if found.num_rows == 0:
        known = runs.column("run_id").to_pylist()
        shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
        uri = normalize_uri(atlas_uri)
        raise AtlasError(f"run {run_id!r} is not in the atlas at {uri}; runs (newest first): {shown or 'none'}")
    return json.loads(found.column("metadata_json")[0].as_py())


# Rows of the latest run per (model, concept, method, ablation); "latest" as in top_neurons.
_LATEST_VIEW = """
CREATE VIEW latest AS
SELECT * FROM neurons
QUALIFY dense_rank() OVER (PARTITION BY model, concept, method, ablation
                           ORDER BY created_at DESC, run_id DESC) = 1
"""
# Applied after the views exist, then frozen: no files, no extensions, no Python variables.
_LOCKDOWN = (
    "SET python_enable_replacements = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)


def _check_select(query: str) -> None:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise AtlasError(f"query is not valid SQL: {e}\nquery: {query}") from e
    if len(statements) != 1:
        raise AtlasError(f"sql takes exactly one SELECT statement, got {len(statements)}\nquery: {query}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise AtlasError(
            f"sql is read-only: only SELECT (or WITH ... SELECT) is allowed, got {kind.name}\nquery: {query}"
        )


def sql_query(atlas_uri: str | os.PathLike, query: str, storage_options: dict | None = None) -> pa.Table:
    """Run one read-only SELECT in DuckDB over the views `neurons`, `latest` and `runs`."""
    _check_select(query)
    uri = normalize_uri(atlas_uri)
    neurons = open_neurons(uri, storage_options)
    runs = _open(uri, RUNS, storage_options)
    con = duckdb.connect(":memory:")
    try:
        # Arrow datasets read through the Delta log; DuckDB scans them lazily with filter pushdown.
        con.register("neurons", neurons.to_pyarrow_dataset() if neurons is not None else ATLAS_SCHEMA.empty_table())
        con.register("runs", runs.to_pyarrow_dataset() if runs is not None else RUNS_SCHEMA.empty_table())
        con.execute(_LATEST_VIEW)
        for statement in _LOCKDOWN:
            con.execute(statement)
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.PermissionException as e:
            raise AtlasError(
                f"sql is read-only and reads only the views neurons, latest and runs: {e}\nquery: {query}"
            ) from e
        except duckdb.Error as e:
            raise AtlasError(f"query failed: {e}\nquery: {query}") from e
    finally:
        con.close()
