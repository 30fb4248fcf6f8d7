"""Read the atlas through the Delta log only: top neurons of a concept, the runs, read-only SQL.

Never list the table directories: staged and uncommitted Parquet files can sit there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from storage.errors import AmbiguousModelError, AtlasError, UnknownConceptError
from storage.location import NEURONS, RUNS, delta_options, normalize_uri, table_uri
from storage.schema import ATLAS_SCHEMA, RUNS_SCHEMA, conform_runs, conform_to_atlas, validate_name


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


COVERAGE_SCHEMA = pa.schema([("run_id", pa.string()), ("model", pa.string()), ("concept", pa.string()),
                             ("method", pa.string()), ("ablation", pa.string()), ("layer", pa.int32()),
                             ("created_at", pa.timestamp("us", tz="UTC"))])
_BLOCK = ["model", "concept", "method", "ablation"]


def _legacy_coverage(dt: DeltaTable, run: dict) -> list[dict]:
    """(concept, method, ablation, layer) of a run whose runs row predates `layers`/`blocks`: from its rows."""
    data = dt.to_pyarrow_dataset(file_pruning_predicate=[("run_id", "=", run["run_id"])])
    held = data.to_table(columns=["concept", "method", "ablation", "layer"], filter=pds.field("run_id") == run["run_id"])
    held = held.group_by(["concept", "method", "ablation", "layer"]).aggregate([])
    return [{**h, "run_id": run["run_id"], "model": run["model"], "created_at": run["created_at"]}
            for h in held.to_pylist()]


def run_coverage(runs: pa.Table, dt: DeltaTable | None) -> pa.Table:
    """Which (model, concept, method, ablation, layer) each run holds (COVERAGE_SCHEMA), from the runs
    table: every block of a run times every layer of it (Arrow/NumPy, no per-row Python)."""
    known = pc.and_(pc.is_valid(runs.column("layers")), pc.is_valid(runs.column("blocks")))
    parts = []
    for run in runs.filter(pc.invert(known)).select(["run_id", "model", "created_at"]).to_pylist():
        if dt is not None:  # a runs row from before `layers`/`blocks`: read what it holds from its rows
            parts.append(pa.Table.from_pylist(_legacy_coverage(dt, run), schema=COVERAGE_SCHEMA))
    runs = runs.filter(known)
    if runs.num_rows:
        blocks = runs.column("blocks").combine_chunks()
        layers = runs.column("layers").combine_chunks()
        owner = np.asarray(pc.list_parent_indices(blocks))  # [blocks] -> its run
        flat = pc.list_flatten(blocks)
        offsets = np.asarray(layers.offsets)
        values = np.asarray(pc.list_flatten(layers))
        count = offsets[owner + 1] - offsets[owner]  # layers of each block's run
        block = np.repeat(np.arange(len(owner)), count)
        within = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        layer = values[np.repeat(offsets[owner], count) + within]
        run = owner[block]
        take = lambda column: column.take(pa.array(run))  # noqa: E731
        parts.append(pa.table({
            "run_id": take(runs.column("run_id")), "model": take(runs.column("model")),
            "concept": flat.field("concept").take(pa.array(block)),
            "method": flat.field("method").take(pa.array(block)),
            "ablation": flat.field("ablation").take(pa.array(block)),
            "layer": pa.array(layer.astype(np.int32)), "created_at": take(runs.column("created_at")),
        }, schema=COVERAGE_SCHEMA))
    return pa.concat_tables(parts) if parts else COVERAGE_SCHEMA.empty_table()


def latest_coverage(coverage: pa.Table) -> pa.Table:
    """The newest run (created_at, then run id) per (model, concept, method, ablation, layer): what
    `latest` shows. A run that scored only some layers shadows older runs only on those layers."""
    order = coverage.sort_by([("created_at", "descending"), ("run_id", "descending")])
    order = order.append_column("position", pa.array(np.arange(order.num_rows, dtype=np.int64)))
    first = order.group_by(_BLOCK + ["layer"], use_threads=False).aggregate([("position", "min")])
    picked = order.take(first.column("position_min")).drop_columns(["position"])
    return picked.sort_by([(c, "ascending") for c in _BLOCK + ["layer"]])


def _rerank(rows: pa.Table, top: int) -> pa.Table:
    """The `top` best rows of one block by the run's ranking rule, ranked 1..top again."""
    from storage.reduce import rank_order  # the rule the reduce ranks by

    order = rank_order(rows.column("layer").to_numpy(), rows.column("neuron").to_numpy(),
                       rows.column("score").combine_chunks())[:top]
    picked = rows.take(pa.array(order, pa.int64()))
    ranks = pa.array(np.arange(1, picked.num_rows + 1, dtype=np.int32))
    return picked.set_column(picked.schema.get_field_index("rank"), "rank", ranks)


def latest_top(dt: DeltaTable, chosen: pa.Table, top: int) -> pa.Table:
    """The `top` rows per (model, concept, method, ablation) of the latest view, ranked across the layers
    shown; `chosen` is `latest_coverage` narrowed to the blocks wanted. Reads only the chosen runs'
    files (pruned by run id in the log) and, per run, its first ranks (sorted files: first row groups)."""
    selections: dict[tuple, dict[str, set[int]]] = {}
    for c in chosen.to_pylist():
        selections.setdefault(tuple(c[k] for k in _BLOCK), {}).setdefault(c["run_id"], set()).add(c["layer"])
    out = []
    depth = top
    pending = dict(selections)
    while pending:
        runs = sorted({r for sel in pending.values() for r in sel})
        models = sorted({b[0] for b in pending})
        concepts = sorted({b[1] for b in pending})
        data = dt.to_pyarrow_dataset(file_pruning_predicate=[("model", "in", models), ("concept", "in", concepts),
                                                             ("run_id", "in", runs)])
        where = (pds.field("run_id").isin(runs) & pds.field("model").isin(models)
                 & pds.field("concept").isin(concepts) & (pds.field("rank") <= depth))
        rows = data.to_table(filter=where)
        deeper = {}
        for block, sel in pending.items():
            mine = rows.filter(pc.and_(pc.and_(pc.equal(rows.column("model"), block[0]),
                                               pc.equal(rows.column("concept"), block[1])),
                                       pc.and_(pc.equal(rows.column("method"), block[2]),
                                               pc.equal(rows.column("ablation"), block[3]))))
            parts, enough = [], True
            for run, layers in sel.items():
                of_run = mine.filter(pc.equal(mine.column("run_id"), run))
                shown = of_run.filter(pc.is_in(of_run.column("layer"), pa.array(sorted(layers), pa.int32())))
                parts.append(shown)
                # A run's own ranks past `depth` can still be in the union's top when shadowed layers
                # took some of its first ranks: read deeper unless the run has no more rows.
                enough &= shown.num_rows >= top or of_run.num_rows < depth
            if enough:
                out.append(_rerank(pa.concat_tables(parts), top))
            else:
                deeper[block] = sel
        pending = deeper
        depth *= 4
    if not out:
        return ATLAS_SCHEMA.empty_table()
    return conform_to_atlas(pa.concat_tables([conform_to_atlas(t) for t in out]))


def _runs_for(uri: str, storage_options: dict | None, as_of: AsOf, dt: DeltaTable) -> pa.Table:
    return run_coverage(list_runs(uri, storage_options, as_of=as_of), dt)


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

    By default from the `latest` view: per layer, the newest run (in the `runs` table) that scored
    the concept with this method and ablation, ranks recomputed across the layers shown; `run_id`
    on each row says where it came from. `ablation=None` returns every ablation. With `run_id`, that
    run's own rows and ranks. `as_of` (a version or a time) reads the atlas as it was then.
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
    what = f"concept {concept!r} of model {model!r}"
    if run_id is not None:
        return _top_of_run(dt, model=model, concept=concept, method=method, ablation=ablation, run_id=run_id,
                           top=top, what=what)

    coverage = _runs_for(uri, storage_options, as_of, dt)
    held = coverage.filter(pc.and_(pc.equal(coverage.column("model"), model),
                                   pc.equal(coverage.column("concept"), concept)))
    if held.num_rows == 0:
        raise AtlasError(f"{what} has no run in the runs table of {uri} (a run committed without its runs row "
                         "is repaired by running it again); name a run with run_id=...")
    mine = held.filter(pc.equal(held.column("method"), method))
    if mine.num_rows == 0:
        methods = sorted(set(held.column("method").to_pylist()))
        raise AtlasError(f"method {method!r} has no rows for {what}; methods: {methods}")
    what += f", method {method!r}"
    if ablation is not None:
        ablations = sorted(set(mine.column("ablation").to_pylist()))
        mine = mine.filter(pc.equal(mine.column("ablation"), ablation))
        if mine.num_rows == 0:
            raise AtlasError(f"ablation {ablation!r} has no rows for {what}; ablations: {ablations}")
    chosen = latest_coverage(mine)
    rows = latest_top(dt, chosen, top).sort_by([("ablation", "ascending"), ("rank", "ascending")])
    return with_sources(rows, chosen)


SOURCES_KEY = b"neuron_atlas.sources"


def with_sources(rows: pa.Table, chosen: pa.Table) -> pa.Table:
    """`rows` with the runs the view drew from (run id -> its layers shown) in the schema metadata."""
    layers: dict[str, set[int]] = {}
    for run, layer in zip(chosen.column("run_id").to_pylist(), chosen.column("layer").to_pylist()):
        layers.setdefault(run, set()).add(layer)
    sources = [{"run_id": run, "layers": sorted(held)} for run, held in sorted(layers.items())]
    return rows.replace_schema_metadata({SOURCES_KEY: json.dumps(sources)})


def read_sources(rows: pa.Table) -> list[dict]:
    """The runs a read drew from: [{"run_id", "layers"}], or the rows' own run ids when not recorded."""
    meta = rows.schema.metadata or {}
    if SOURCES_KEY in meta:
        return json.loads(meta[SOURCES_KEY])
    return [{"run_id": run, "layers": None} for run in sorted(set(rows.column("run_id").to_pylist()))]


def describe_sources(rows: pa.Table) -> str:
    """A short header naming the runs of a read, e.g. "runs r2 (layer 5), r1 (layers 0-4, 6-29)"."""
    parts = []
    for source in read_sources(rows):
        layers = source["layers"]
        if layers is None:
            parts.append(source["run_id"])
            continue
        spans, start = [], layers[0]
        for prev, cur in zip(layers, layers[1:] + [None]):
            if cur != prev + 1 if cur is not None else True:
                spans.append(f"{start}" if start == prev else f"{start}-{prev}")
                start = cur
        parts.append(f"{source['run_id']} (layer{'s' if len(layers) > 1 else ''} {', '.join(spans)})")
    return ("run " if len(parts) == 1 else "runs ") + ", ".join(parts)


def _top_of_run(dt: DeltaTable, *, model: str, concept: str, method: str, ablation: str | None, run_id: str,
                top: int, what: str) -> pa.Table:
    """One run's own top rows (its ranks), reading only its files."""
    validate_name("run", run_id)
    data = dt.to_pyarrow_dataset(file_pruning_predicate=[("model", "=", model), ("concept", "=", concept),
                                                         ("run_id", "=", run_id)])
    where = (pds.field("model") == model) & (pds.field("concept") == concept) & (pds.field("run_id") == run_id)
    heads = data.to_table(columns=["method", "ablation"], filter=where & (pds.field("rank") == 1))
    held = pc.equal(heads.column("method"), method)
    what += f", method {method!r}"
    if ablation is not None:
        held = pc.and_(held, pc.equal(heads.column("ablation"), ablation))
        what += f", ablation {ablation!r}"
        where &= pds.field("ablation") == ablation
    if not pc.any(held).as_py():
        # Only on this error: which runs do hold it (rank-1 rows of the partition).
        every = dt.to_pyarrow_dataset(file_pruning_predicate=[("model", "=", model), ("concept", "=", concept)])
        want = (pds.field("rank") == 1) & (pds.field("method") == method)
        if ablation is not None:
            want &= pds.field("ablation") == ablation
        runs = sorted(set(every.to_table(columns=["run_id"], filter=want).column("run_id").to_pylist()))
        raise AtlasError(f"run {run_id!r} has no rows for {what}; runs that do: {runs}")
    rows = data.to_table(filter=where & (pds.field("method") == method) & (pds.field("rank") <= top))
    return conform_to_atlas(rows.sort_by([("ablation", "ascending"), ("rank", "ascending")]))


def list_runs(atlas_uri: str | os.PathLike, storage_options: dict | None = None, *, as_of: AsOf = None) -> pa.Table:
    """The `runs` table (RUNS_SCHEMA), newest commit first; empty when the atlas has no runs.

    With `as_of`, only the runs whose rows were committed at or before that `neurons` version or time.
    """
    uri = normalize_uri(atlas_uri)
    dt = _open(uri, RUNS, storage_options)
    if dt is None:
        return RUNS_SCHEMA.empty_table()
    runs = conform_runs(dt.to_pyarrow_dataset().to_table())
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


# `latest`: per (model, concept, method, ablation, layer) the rows of the newest run holding it, as
# `latest_coverage` picks from the runs table (registered as atlas_latest_runs), ranks recomputed
# across the layers shown (score descending, NaN then null last, ties to the lower layer, neuron).
_RANK = ("CAST(row_number() OVER (PARTITION BY n.model, n.concept, n.method, n.ablation "
         "ORDER BY n.score IS NULL, isnan(n.score), n.score DESC, n.layer, n.neuron) AS INTEGER)")


def _latest_view() -> str:
    columns = ", ".join(f"{_RANK} AS rank" if name == "rank" else f"n.{name}" for name in ATLAS_SCHEMA.names)
    return (f"CREATE VIEW latest AS SELECT {columns} FROM atlas_latest_neurons n JOIN atlas_latest_runs c "
            "ON n.run_id = c.run_id AND n.model = c.model AND n.concept = c.concept AND n.method = c.method "
            "AND n.ablation = c.ablation AND n.layer = c.layer")


# Applied after the views exist, then frozen: no files, no extensions, no Python variables.
_LOCKDOWN = (
    "SET python_enable_replacements = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)


# DuckDB parses PIVOT into a MULTI statement (a CREATE TYPE of the pivoted values, then the SELECT);
# it only reads, and the in-memory catalog it types into is thrown away with the connection.
_READ_ONLY_MULTI = re.compile(r"(?is)\s*(--[^\n]*\n\s*|/\*.*?\*/\s*)*(PIVOT|PIVOT_WIDER)\b")
QUERY_EXCERPT = 200  # characters of a query quoted in an error message


def excerpt(text: object, limit: int = QUERY_EXCERPT) -> str:
    """`text` on one line, cut to `limit` characters (errors never quote a whole huge value)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else f"{flat[:limit]}... ({len(flat):,} characters)"


def _check_select(query: str) -> None:
    shown = excerpt(query)
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise AtlasError(f"query is not valid SQL: {excerpt(e)} (query: {shown})") from e
    if len(statements) != 1:
        raise AtlasError(f"sql takes exactly one SELECT statement, got {len(statements)} (query: {shown})")
    kind = statements[0].type
    if kind == duckdb.StatementType.MULTI and _READ_ONLY_MULTI.match(query):
        return
    if kind != duckdb.StatementType.SELECT:
        raise AtlasError(
            f"sql is read-only: only SELECT (or WITH ... SELECT, PIVOT) is allowed, got {kind.name} (query: {shown})"
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
    coverage = run_coverage(runs, neurons)
    if run_id is not None:
        coverage = coverage.filter(pc.equal(coverage.column("run_id"), run_id))
    chosen = latest_coverage(coverage)
    shown = sorted(set(chosen.column("run_id").to_pylist()))
    con = duckdb.connect(":memory:")
    try:
        empty = ATLAS_SCHEMA.empty_table()
        con.register("atlas_neurons",
                     neurons.to_pyarrow_dataset() if neurons is not None else empty)
        # `latest` reads only the files of the runs it shows (pruned by run id in the Delta log).
        con.register("atlas_latest_neurons", neurons.to_pyarrow_dataset(
            file_pruning_predicate=[("run_id", "in", shown)]) if neurons is not None and shown else empty)
        con.register("atlas_latest_runs", chosen)
        con.register("atlas_runs", runs)
        where = f" WHERE run_id = '{run_id}'" if run_id is not None else ""  # a validated slug
        con.execute(f"CREATE VIEW neurons AS SELECT * FROM atlas_neurons{where}")
        con.execute("CREATE VIEW runs AS SELECT * FROM atlas_runs")
        from storage.drift import drift_table  # drift between runs of a family (storage/drift.py)

        con.register("atlas_drift", drift_table(uri, storage_options))
        con.execute("CREATE VIEW drift AS SELECT * FROM atlas_drift")
        con.execute(_latest_view())
        from storage.specificity import register_view  # the specific ranking's table, when runs wrote one

        register_view(con, uri, storage_options, run_id=run_id, as_of=as_of)
    except BaseException:
        con.close()
        raise
    return con


SQL_TIMEOUT_S = 60.0  # `sql --timeout`
SQL_MEMORY_LIMIT = "2GB"  # `sql --memory-limit`: DuckDB's own default is 80% of the machine's memory
SQL_BATCH_ROWS = 65_536  # rows per record batch streamed out


class SqlTimeout(AtlasError):
    """The query ran longer than its timeout and was interrupted."""


def _sql_error(e: BaseException, query: str, memory_limit: str) -> AtlasError:
    shown = excerpt(query)
    if isinstance(e, duckdb.PermissionException):
        return AtlasError(f"sql is read-only and reads only the views neurons, latest and runs: {excerpt(e)} "
                          f"(query: {shown})")
    if isinstance(e, duckdb.OutOfMemoryException):
        return AtlasError(f"query needs more than its memory limit {memory_limit} (--memory-limit): {excerpt(e)} "
                          f"(query: {shown})")
    return AtlasError(f"query failed: {excerpt(e)} (query: {shown})")


class SqlStream:
    """A running read-only query: `batches()` yields its result as Arrow record batches (the result is
    never held whole), `interrupt()` stops it from any thread. Use as a context manager: leaving closes
    the connection and removes the query's private spill directory."""

    def __init__(self, con: duckdb.DuckDBPyConnection, query: str, memory_limit: str, spill_root: str):
        self._con, self.query, self.memory_limit, self._spill_root = con, query, memory_limit, spill_root
        self.interrupted = False

    def result(self, batch_rows: int = SQL_BATCH_ROWS) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """Start the query: its result schema and an iterator of its record batches."""
        with self._errors():
            relation = self._con.sql(self.query)
            reader = relation.to_arrow_reader(batch_rows) if hasattr(relation, "to_arrow_reader") \
                else relation.fetch_record_batch(batch_rows)
        return reader.schema, self._batches(reader)

    def _batches(self, reader) -> Iterator[pa.RecordBatch]:
        with self._errors():
            yield from reader

    @contextmanager
    def _errors(self):
        try:
            yield
        except (duckdb.Error, OSError) as e:  # pyarrow surfaces a DuckDB error while reading as OSError
            if self.interrupted:
                raise _Interrupted() from None
            raise _sql_error(e, self.query, self.memory_limit) from None

    def interrupt(self) -> None:
        self.interrupted = True
        self._con.interrupt()

    def __enter__(self) -> "SqlStream":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._con.close()
        except duckdb.Error:  # still busy in a worker that would not stop: the process is exiting anyway
            pass
        finally:
            shutil.rmtree(self._spill_root, ignore_errors=True)


class _Interrupted(Exception):
    """The query was interrupted on purpose (timeout or Ctrl-C); the caller knows which."""


def open_sql(
    atlas_uri: str | os.PathLike,
    query: str,
    storage_options: dict | None = None,
    *,
    run_id: str | None = None,
    as_of: AsOf = None,
    memory_limit: str = SQL_MEMORY_LIMIT,
) -> SqlStream:
    """Check one read-only statement and prepare it over the views `neurons`, `latest` and `runs`.

    DuckDB gets `memory_limit` and spills to a fresh directory only this process can read (mode 0700,
    removed afterwards); then files, extensions and settings are locked away.
    """
    _check_select(query)
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", str(memory_limit).strip(), re.IGNORECASE):
        raise AtlasError(f"memory limit {excerpt(memory_limit, 40)!r} is not a size such as 500MB or 2GB")
    con = connect_views(atlas_uri, storage_options, run_id=run_id, as_of=as_of)
    spill_root = tempfile.mkdtemp(prefix="neuron-atlas-sql-")  # mode 0700
    try:
        con.execute(f"SET memory_limit = '{memory_limit.strip()}'")
        con.execute(f"SET temp_directory = '{os.path.join(spill_root, 'spill')}'")
        for statement in _LOCKDOWN:
            con.execute(statement)
    except BaseException:
        con.close()
        shutil.rmtree(spill_root, ignore_errors=True)
        raise
    return SqlStream(con, query, memory_limit, spill_root)


def _stop(worker: threading.Thread, stream: SqlStream, patience_s: float = 30.0) -> None:
    """Interrupt until the worker stops: an interrupt that lands between two DuckDB calls (while the
    query is still being bound, say) is lost, so it is repeated."""
    give_up = time.monotonic() + patience_s
    while worker.is_alive() and time.monotonic() < give_up:
        stream.interrupt()
        worker.join(0.05)


def bounded(work, stream: SqlStream, timeout_s: float | None):
    """Run `work()` (which reads `stream`) in a worker thread while this thread waits: at `timeout_s`
    seconds, or on Ctrl-C (KeyboardInterrupt reaches only this thread, never a thread inside DuckDB),
    the query is interrupted; SqlTimeout or KeyboardInterrupt is raised once the worker has stopped."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = work()
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e

    worker = threading.Thread(target=target, name="neuron-atlas-sql", daemon=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))
            if worker.is_alive() and deadline is not None and time.monotonic() >= deadline:
                _stop(worker, stream)
                raise SqlTimeout(f"query stopped after its timeout of {timeout_s:g} s (--timeout): "
                                 f"{excerpt(stream.query)}")
    except BaseException:  # Ctrl-C, SIGTERM (the CLI raises on it): stop the query before leaving
        _stop(worker, stream)
        raise
    error = outcome.get("error")
    if isinstance(error, _Interrupted):  # interrupted, but the worker finished before we raised
        raise KeyboardInterrupt
    if error is not None:
        raise error
    return outcome.get("value")


def sql_query(
    atlas_uri: str | os.PathLike,
    query: str,
    storage_options: dict | None = None,
    *,
    run_id: str | None = None,
    as_of: AsOf = None,
    timeout_s: float | None = SQL_TIMEOUT_S,
    memory_limit: str = SQL_MEMORY_LIMIT,
) -> pa.Table:
    """Run one read-only SELECT in DuckDB over the views `neurons`, `latest` and `runs`, as a table.

    Bounded: `timeout_s` seconds (None: no limit) and DuckDB's `memory_limit`; the command line
    streams instead (`open_sql`), so that a large result is never held whole.
    """
    with open_sql(atlas_uri, query, storage_options, run_id=run_id, as_of=as_of,
                  memory_limit=memory_limit) as stream:
        def work():
            schema, batches = stream.result()
            return pa.Table.from_batches(list(batches), schema=schema)

        return bounded(work, stream, timeout_s)
