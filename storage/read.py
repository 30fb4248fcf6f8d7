"""Read the atlas through the Delta log only: top neurons of a concept, the runs, read-only SQL.

Never list the table directories: staged and uncommitted Parquet files can sit there.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from storage.errors import AmbiguousModelError, AtlasError, UnknownConceptError
from storage.location import NEURONS, RUNS, delta_options, normalize_uri, table_uri
from storage.schema import ATLAS_SCHEMA, RUNS_SCHEMA, conform_to_atlas, validate_name


AsOf = int | str | datetime | None


def parse_as_of(value: AsOf) -> int | datetime | None:
    """An atlas version (int, or a string of digits) or a point in time (ISO 8601; naive means UTC)."""
    if value is None or isinstance(value, datetime) or (isinstance(value, int) and not isinstance(value, bool)):
        moment = value
    elif isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        moment = int(value)
    else:
        try:
            moment = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            raise AtlasError(f"as-of {value!r} is neither a version number nor an ISO 8601 time "
                             "such as 2026-11-22T07:00:00Z") from None
    if isinstance(moment, int) and moment < 0:
        raise AtlasError(f"as-of version {moment} must be >= 0")
    if isinstance(moment, datetime) and moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


def _open(uri: str, name: str, storage_options: dict | None, as_of: AsOf = None) -> DeltaTable | None:
    where = table_uri(uri, name)
    try:
        dt = DeltaTable(where, storage_options=delta_options(storage_options))
    except TableNotFoundError:
        return None
    except (DeltaError, OSError) as e:
        raise AtlasError(f"cannot read the atlas table {where}: {e}") from e
    moment = parse_as_of(as_of)
    if moment is None:
        return dt
    if isinstance(moment, datetime):
        # The newest version committed at or before `moment`, from the commit times in the log
        # (DeltaTable.history of a time-travelled table numbers versions oddly in delta-rs 1.6).
        limit_ms = moment.timestamp() * 1000
        times = {c["version"]: c["timestamp"] for c in dt.history()}
        earlier = [v for v, t in times.items() if t <= limit_ms]
        if not earlier:
            first = datetime.fromtimestamp(times[min(times)] / 1000, tz=timezone.utc).isoformat()
            raise AtlasError(f"as-of {moment.isoformat()}: the atlas at {uri} has no such version: "
                             f"its first is from {first}")
        moment = max(earlier)
    latest = dt.version()
    if moment > latest:
        raise AtlasError(f"as-of version {moment} is not in the atlas at {uri}: versions 0..{latest}")
    try:
        dt.load_as_version(moment)
    except (DeltaError, OSError, ValueError) as e:
        raise AtlasError(f"as-of {as_of!r}: the atlas at {uri} has no such version ({e})") from e
    return dt


def open_neurons(
    atlas_uri: str | os.PathLike, storage_options: dict | None = None, *, as_of: AsOf = None
) -> DeltaTable | None:
    """The `neurons` Delta table at its latest version (or `as_of` a version or time), None if absent."""
    return _open(normalize_uri(atlas_uri), NEURONS, storage_options, as_of)


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
    as_of: AsOf = None,
) -> pa.Table:
    """The `top` highest-ranked neurons of a concept (ATLAS_SCHEMA rows, by ablation then rank).

    By default from the latest run (newest created_at) holding the concept for this model, method
    and, if given, ablation; `ablation=None` returns every ablation of that run. `as_of` (a version
    or a time) reads the atlas as it was then.
    """
    if not isinstance(top, int) or top < 1:
        raise AtlasError(f"top {top!r} must be a positive integer")
    uri = normalize_uri(atlas_uri)
    dt = open_neurons(uri, storage_options, as_of=as_of)
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
            f"concept {concept!r} is not in the atlas at {uri}{scope}; available concepts: {', '.join(available) or 'none'}",
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
    return conform_to_atlas(rows)


def list_runs(atlas_uri: str | os.PathLike, storage_options: dict | None = None, *, as_of: AsOf = None) -> pa.Table:
    """The `runs` table (RUNS_SCHEMA), newest commit first; empty when the atlas has no runs.

    With `as_of`, only the runs whose rows were committed at or before that `neurons` version or time.
    """
    uri = normalize_uri(atlas_uri)
    dt = _open(uri, RUNS, storage_options)
    if dt is None:
        return RUNS_SCHEMA.empty_table()
    runs = dt.to_pyarrow_dataset().to_table()
    if as_of is not None:
        neurons = open_neurons(uri, storage_options, as_of=as_of)
        limit = neurons.version() if neurons is not None else -1
        runs = runs.filter(pc.less_equal(runs.column("neurons_version"), limit))
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


def connect_views(
    atlas_uri: str | os.PathLike,
    storage_options: dict | None = None,
    *,
    run_id: str | None = None,
    as_of: AsOf = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views `neurons`, `latest` and `runs` over the atlas.

    `run_id` narrows `neurons` (and so `latest`) to one run's rows; `as_of` reads the atlas as it was
    at a version or time. The views scan Arrow datasets built from the Delta log (filters push down).
    """
    uri = normalize_uri(atlas_uri)
    neurons = open_neurons(uri, storage_options, as_of=as_of)
    runs = list_runs(uri, storage_options, as_of=as_of)
    if run_id is not None:
        validate_name("run", run_id)
        known = runs.column("run_id").to_pylist()
        if run_id not in known:
            when = f" as of {as_of}" if as_of is not None else ""
            raise AtlasError(f"run {run_id!r} is not in the atlas at {uri}{when}; runs (newest first): "
                             f"{', '.join(known[:10]) or 'none'}")
    con = duckdb.connect(":memory:")
    try:
        con.register("atlas_neurons",
                     neurons.to_pyarrow_dataset() if neurons is not None else ATLAS_SCHEMA.empty_table())
        con.register("atlas_runs", runs)
        where = f" WHERE run_id = '{run_id}'" if run_id is not None else ""  # a validated slug
        con.execute(f"CREATE VIEW neurons AS SELECT * FROM atlas_neurons{where}")
        con.execute("CREATE VIEW runs AS SELECT * FROM atlas_runs")
        con.execute(_LATEST_VIEW)
        from storage.specificity import register_view  # the specific ranking's table, when runs wrote one

        register_view(con, uri, storage_options, run_id=run_id, as_of=as_of)
    except BaseException:
        con.close()
        raise
    return con


def sql_query(
    atlas_uri: str | os.PathLike,
    query: str,
    storage_options: dict | None = None,
    *,
    run_id: str | None = None,
    as_of: AsOf = None,
) -> pa.Table:
    """Run one read-only SELECT in DuckDB over the views `neurons`, `latest` and `runs`."""
    _check_select(query)
    con = connect_views(atlas_uri, storage_options, run_id=run_id, as_of=as_of)
    try:
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
