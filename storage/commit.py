"""Rank a run's rows and commit them to the atlas as one Delta version, exactly once per run id.

Protocol: the streaming reduce (storage/reduce.py) writes the run's data files once; then only the
small log entry is committed (`DeltaTable.create_write_transaction`) with the Delta app transaction
("neuron-atlas:<run_id>", v), v being the version it lands at. A lost race re-reads the log: if the
run's transaction is there (another driver committed this run) the files just written are removed,
else the same add actions are tried at the next version. Nothing is re-encoded or re-uploaded.

Run metadata has one source of truth, the `runs` table. Before the `neurons` commit, the run's
record (its runs row but the version) is staged at `_staging/<run_id>/_run.json`; it goes once the
runs row is in. A driver killed between the two commits leaves the record, and committing the run
again (a rerun of the same run id) adds the missing runs row from it.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from deltalake import DeltaTable, WriterProperties
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.schema import Field
from deltalake.transaction import AddAction, CommitProperties, Transaction

from storage.errors import AtlasError, CommitRaceError
from storage.location import (NEURONS, RUNS, atlas_filesystem, delta_options, normalize_uri, secret_values,
                              staging_dir, table_uri)
from storage.reduce import Block, ReducedRun, reduce_run, remove_files, table_batches
from storage.schema import ATLAS_SCHEMA, RUNS_SCHEMA, SHARD_SCHEMA, check_keys, check_schema, validate_name
from storage.staging import iter_staged

APP_ID = "neuron-atlas"
# Partitioned by model and concept: a top-neurons read opens only its concept's files, and the
# concepts and models on offer come from the log's partition values without reading data.
PARTITION_BY = ["model", "concept"]
# Within a partition rows go (method, ablation, rank): small row groups let a `rank <= k` read stop
# at the first row group of each block (Parquet min/max statistics). `atlas optimize` keeps them.
WRITER = WriterProperties(max_row_group_size=16_384, compression="ZSTD")
# A checkpoint every 20 versions (Delta's default: 100): opening a table reads at most 19 JSON
# commits after the newest checkpoint, one request each on object storage.
TABLE_CONFIG = {"delta.checkpointInterval": "20"}
RUNS_FILES_MAX = 16  # the runs table is compacted by the commit that finds more files than this
RUN_RECORD = "_run.json"  # beside the staged shards; staged_shards lists only *.parquet
# Test hook: NEURON_ATLAS_CRASH_AT=between-commits kills this process (SIGKILL) right after the
# `neurons` commit, before the runs row: the crash the rerun must repair.
CRASH_ENV = "NEURON_ATLAS_CRASH_AT"
RUN_KEY_META = "neuron_atlas.run_id"
_GROUP = ["model", "concept", "method", "ablation", "run_id"]
_ATTEMPTS = 8  # commits lost to concurrent writers before giving up


def app_id(run_id: str) -> str:
    """The Delta app transaction id that marks a run as committed (in both tables)."""
    return f"{APP_ID}:{run_id}"


def rank_rows(table: pa.Table) -> pa.Table:
    """Add `rank` (int32, 1 = highest score) within (model, concept, method, ablation, run_id).

    The in-memory reference for the streaming reduce (storage/reduce.py), which tests check against it.

    Ranks run across all layers; ties go to the lower (layer, neuron); NaN then null scores rank last.
    Rows come back sorted by model, concept, method, ablation, run_id, rank.
    """
    check_schema(table, SHARD_SCHEMA, what="rows to rank")
    check_keys(table, what="rows to rank")
    keys = [(c, "ascending") for c in _GROUP]
    keys += [("score", "descending"), ("layer", "ascending"), ("neuron", "ascending")]
    ranked = table.take(pc.sort_indices(table, sort_keys=keys)).combine_chunks()
    n = ranked.num_rows
    starts_group = np.zeros(n, dtype=bool)
    if n:
        starts_group[0] = True
    if n > 1:
        for name in _GROUP:
            col = ranked.column(name)
            starts_group[1:] |= ~pc.equal(col.slice(1), col.slice(0, n - 1)).to_numpy()
    index = np.arange(n)
    first = np.maximum.accumulate(np.where(starts_group, index, 0))  # index of each row's group start
    rank = pa.array((index - first + 1).astype(np.int32), type=pa.int32())
    return ranked.append_column(pa.field("rank", pa.int32()), rank)


def _open(uri: str, options: dict | None) -> DeltaTable | None:
    try:
        return DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        return None


def _create(uri: str, schema: pa.Schema, *, partition_by: list[str] | None, options: dict | None) -> DeltaTable:
    """The table, created empty (version 0) if it does not exist; losing a creation race is fine.

    No commit retries: a retried create lands as a second CREATE TABLE version (new table id) when
    two writers race to create the atlas (seen with delta-rs 1.6 on S3).
    """
    found = _open(uri, options)
    if found is not None:
        return found
    try:
        DeltaTable.create(uri, schema, mode="ignore", partition_by=partition_by, storage_options=options,
                          commit_properties=CommitProperties(max_commit_retries=0), configuration=TABLE_CONFIG)
    except DeltaError as e:
        if _open(uri, options) is None:
            raise AtlasError(f"cannot create the atlas table {uri}: {e}") from e
    return DeltaTable(uri, storage_options=options)


def _evolve(dt: DeltaTable, schema: pa.Schema) -> None:
    """Add the columns of `schema` a table created by an older release lacks (null for its old rows)."""
    have = set(pa.schema(dt.schema().to_arrow()).names)
    missing = [f for f in schema if f.name not in have]
    if missing:
        try:
            dt.alter.add_columns([Field.from_arrow(f) for f in missing])
        except DeltaError:
            dt.update_incremental()
            present = set(pa.schema(dt.schema().to_arrow()).names)
            if not all(f.name in present for f in missing):  # not just a concurrent writer adding them first
                raise
        dt.update_incremental()


def _metadata_json(metadata: dict, run_id: str) -> str:
    if not isinstance(metadata, dict):
        raise AtlasError(f"metadata of run {run_id!r} must be a dict, got {type(metadata).__name__}")
    try:
        # Delta commit info is JSON: NaN and Infinity are not representable there.
        return json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise AtlasError(f"metadata of run {run_id!r} is not JSON (plain values, no NaN/Infinity): {e}") from e


def _commit_actions(dt: DeltaTable, actions: list[AddAction], *, app: str, partition_by: list[str] | None,
                    custom: dict, what: str) -> tuple[int, bool]:
    """Commit already-written files' add actions tagged with `app` unless it is recorded.

    Returns (the version holding `app`, whether this call committed it). Only the log entry is retried.
    """
    for attempt in range(_ATTEMPTS):
        if attempt:
            time.sleep(random.uniform(0, 0.02 * attempt))  # jitter: racing drivers stop colliding in step
            dt.update_incremental()  # only the log entries since: nothing else is re-read
        done = dt.transaction_version(app)
        if done is not None:
            return done, False
        version = dt.version() + 1
        props = CommitProperties(
            custom_metadata=custom,
            app_transactions=[Transaction(app, version)],
            max_commit_retries=0,  # land at `version` or fail; a retry would shift the version
        )
        try:
            dt.create_write_transaction(actions, "append", dt.schema(), partition_by=partition_by,
                                        commit_properties=props)
            return version, True
        except CommitFailedError:
            continue  # another writer took `version` (maybe this very run): re-read the log
        except DeltaError as e:
            raise AtlasError(f"cannot commit {what} to {dt.table_uri}: {e}") from e
    raise CommitRaceError(f"cannot commit {what} to {dt.table_uri}: {_ATTEMPTS} attempts lost to concurrent commits; "
                          "run it again")


def commit_run(
    atlas_uri: str | os.PathLike,
    rows: pa.Table,
    *,
    run_id: str,
    metadata: dict,
    storage_options: dict | None = None,
) -> int:
    """Rank a whole run's rows (SHARD_SCHEMA) and commit them as one `neurons` version; return it.

    Committing a run id again changes nothing and returns the version of the first commit (and adds
    the run's `runs` row if a crash left it out). Validation happens before any commit, and a failed
    commit leaves readers on the previous version and removes the files it wrote.
    """
    validate_name("run", run_id)
    what = f"rows of run {run_id!r}"
    check_schema(rows, SHARD_SCHEMA, what=what)
    if rows.num_rows == 0:
        raise AtlasError(f"{what}: no rows to commit")
    return _commit(atlas_uri, lambda: table_batches(rows), run_id=run_id, metadata=metadata,
                   storage_options=storage_options, what=what, expected_rows=None)


def commit_staged_run(
    atlas_uri: str | os.PathLike,
    *,
    run_id: str,
    shard_ids: list[str],
    metadata: dict,
    expected_rows: int | None = None,
    storage_options: dict | None = None,
    spill_dir: str | None = None,
) -> int:
    """Stream a run's staged shards through the reduce and commit them as one `neurons` version.

    The driver's memory holds one record batch and one (concept, method, ablation) group at a time,
    whatever the run's size (see storage/reduce.py); `spill_dir` is local scratch (default: TMPDIR).
    """
    validate_name("run", run_id)

    def batches():
        return iter_staged(atlas_uri, run_id=run_id, shard_ids=shard_ids, storage_options=storage_options)

    return _commit(atlas_uri, batches, run_id=run_id, metadata=metadata, storage_options=storage_options,
                   what=f"rows of run {run_id!r}", expected_rows=expected_rows, spill_dir=spill_dir)


def _commit(atlas_uri, batches, *, run_id: str, metadata: dict, storage_options: dict | None, what: str,
            expected_rows: int | None, spill_dir: str | None = None) -> int:
    metadata_json = _metadata_json(metadata, run_id)
    if any(secret in metadata_json for secret in secret_values(storage_options)):
        # The metadata goes into the runs table, readable by anyone who reads the atlas.
        raise AtlasError(f"metadata of run {run_id!r} contains a credential from storage_options; "
                         "redact it (storage.location.redact_options) before committing")
    uri = normalize_uri(atlas_uri)
    try:
        return _commit_checked(uri, batches, run_id=run_id, metadata_json=metadata_json,
                               storage_options=storage_options, what=what, expected_rows=expected_rows,
                               spill_dir=spill_dir)
    except (OSError, DeltaError) as e:  # the store failed (went away, refused): readers keep the last version
        raise AtlasError(f"cannot commit run {run_id!r} to {uri}: {type(e).__name__}: {e}") from e


def _record(reduced: ReducedRun, metadata_json: str) -> dict:
    """The run's `runs` row without its `neurons_version` (JSON-ready)."""
    return {
        "run_id": reduced.run_id,
        "model": reduced.model,
        "model_revision": reduced.revision,
        "concepts": sorted({b.concept for b in reduced.blocks}),
        "methods": sorted({b.method for b in reduced.blocks}),
        "ablations": sorted({b.ablation for b in reduced.blocks}),
        "rows": reduced.rows,
        "created_at": reduced.created_at.isoformat(),
        "metadata_json": metadata_json,
        "layers": reduced.layers,
        "blocks": [{"concept": b.concept, "method": b.method, "ablation": b.ablation, "rows": b.rows}
                   for b in reduced.blocks],
    }


def _record_from_rows(neurons_uri: str, run_id: str, metadata_json: str, options: dict | None) -> dict:
    """A committed run's record read back from its rows (pruned to its files), with the given metadata."""
    dt = DeltaTable(neurons_uri, storage_options=options)
    data = dt.to_pyarrow_dataset(file_pruning_predicate=[("run_id", "=", run_id)])
    counts: dict[tuple[str, str, str], int] = {}
    layers: set[int] = set()
    first = None
    for batch in data.to_batches(columns=["model", "model_revision", "concept", "method", "ablation", "layer",
                                          "created_at"], filter=pds.field("run_id") == run_id):
        table = pa.Table.from_batches([batch])
        if not table.num_rows:
            continue
        first = first or table.slice(0, 1).to_pylist()[0]
        layers.update(pc.unique(table.column("layer")).to_pylist())
        for row in table.group_by(["concept", "method", "ablation"]).aggregate([([], "count_all")]).to_pylist():
            key = (row["concept"], row["method"], row["ablation"])
            counts[key] = counts.get(key, 0) + row["count_all"]
    if first is None:
        raise AtlasError(f"run {run_id!r} is committed in {neurons_uri} but none of its rows can be read back")
    blocks = [Block(*key, rows=n) for key, n in sorted(counts.items())]
    reduced = ReducedRun(model=first["model"], revision=first["model_revision"], run_id=run_id,
                         created_at=first["created_at"], rows=sum(counts.values()), layers=sorted(layers),
                         blocks=blocks, actions=[], paths=[])
    return _record(reduced, metadata_json)


def _record_path(uri: str, run_id: str, storage_options: dict | None):
    fs, root = atlas_filesystem(uri, storage_options)
    return fs, f"{staging_dir(root, run_id)}/{RUN_RECORD}"


def _stage_record(uri: str, record: dict, storage_options: dict | None) -> None:
    fs, path = _record_path(uri, record["run_id"], storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    # Written aside, then moved into place: a driver committing the same run at the same moment reads
    # either no record or a whole one, never a half-written file (an object store PUT is atomic anyway).
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    with fs.open(partial, "wb") as f:
        f.write(json.dumps(record, sort_keys=True).encode())
    fs.mv(partial, path)


def _load_record(uri: str, run_id: str, storage_options: dict | None) -> dict | None:
    fs, path = _record_path(uri, run_id, storage_options)
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None


def _drop_record(uri: str, run_id: str, storage_options: dict | None) -> None:
    fs, path = _record_path(uri, run_id, storage_options)
    remove_files(fs, [path])
    directory = path.rsplit("/", 1)[0]
    try:  # a directory made only for the record (an in-memory commit) goes with it
        fs.invalidate_cache(directory)
        if not fs.ls(directory):
            fs.rmdir(directory)
    except (FileNotFoundError, OSError):
        pass


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _commit_checked(uri: str, batches, *, run_id: str, metadata_json: str, storage_options: dict | None,
                    what: str, expected_rows: int | None, spill_dir: str | None) -> int:
    options = delta_options(storage_options)
    neurons_uri = table_uri(uri, NEURONS)
    app = app_id(run_id)
    neurons = _create(neurons_uri, ATLAS_SCHEMA, partition_by=PARTITION_BY, options=options)
    version = neurons.transaction_version(app)
    runs_uri = table_uri(uri, RUNS)
    if version is not None:  # committed before: at most its runs row is missing
        runs = _open(runs_uri, options)
        if runs is not None and runs.transaction_version(app) is not None:
            return version
        record = _load_record(uri, run_id, storage_options)
        if record is None:  # the staged record is gone too: rebuild it from the committed rows
            record = _record_from_rows(neurons_uri, run_id, metadata_json, options)
    else:
        fs, root = atlas_filesystem(neurons_uri, storage_options)
        reduced = reduce_run(batches(), fs=fs, table_root=root, run_id=run_id,
                             created_at=datetime.now(timezone.utc), what=what, spill_dir=spill_dir)
        try:
            if expected_rows is not None and reduced.rows != expected_rows:
                raise AtlasError(f"{what}: staged {reduced.rows} rows, planned {expected_rows}")
            record = _record(reduced, metadata_json)
            _stage_record(uri, record, storage_options)
            _evolve(neurons, ATLAS_SCHEMA)
            # userMetadata (what Spark shows in DESCRIBE HISTORY) names the run; its metadata is in `runs`.
            custom = {"userMetadata": json.dumps({"run_id": run_id}), RUN_KEY_META: run_id}
            neurons.update_incremental()  # the reduce took a while: start from the newest version
            version, wrote = _commit_actions(neurons, reduced.actions, app=app, partition_by=PARTITION_BY,
                                             custom=custom, what=f"run {run_id!r}")
        except BaseException:
            remove_files(fs, reduced.paths)
            raise
        if not wrote:  # another driver committed this run first: our files would be orphans
            remove_files(fs, reduced.paths)
            record = _load_record(uri, run_id, storage_options) or record
        _crash_point("between-commits")
    _commit_runs_row(uri, record, version, storage_options)
    _drop_record(uri, run_id, storage_options)
    return version


def _commit_runs_row(uri: str, record: dict, version: int, storage_options: dict | None) -> None:
    """Write the run's one `runs` row as a data file once, then commit it (once per run id)."""
    options = delta_options(storage_options)
    runs_uri = table_uri(uri, RUNS)
    app = app_id(record["run_id"])
    runs = _create(runs_uri, RUNS_SCHEMA, partition_by=None, options=options)
    if runs.transaction_version(app) is not None:
        return
    _evolve(runs, RUNS_SCHEMA)
    row = dict(record, neurons_version=version, created_at=datetime.fromisoformat(record["created_at"]))
    table = pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
    fs, root = atlas_filesystem(runs_uri, storage_options)
    relative = f"part-{record['run_id']}-{uuid.uuid4().hex[:12]}.parquet"
    path = f"{root}/{relative}"
    fs.makedirs(root, exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    stats = {"numRecords": 1,
             "minValues": {"run_id": record["run_id"], "model": record["model"], "neurons_version": version},
             "maxValues": {"run_id": record["run_id"], "model": record["model"], "neurons_version": version},
             "nullCount": {name: int(table.column(name).null_count) for name in RUNS_SCHEMA.names}}
    action = AddAction(relative, fs.size(path), {}, int(time.time() * 1000), True, json.dumps(stats))
    try:
        _, wrote = _commit_actions(runs, [action], app=app, partition_by=None,
                                   custom={RUN_KEY_META: record["run_id"]},
                                   what=f"the runs row of run {record['run_id']!r}")
    except BaseException:
        remove_files(fs, [path])
        raise
    if not wrote:
        remove_files(fs, [path])
        return
    _keep_runs_compact(runs)


def _keep_runs_compact(runs: DeltaTable) -> None:
    """Every reader reads the whole runs table: keep it to a few files as runs accumulate (one per run
    otherwise). A failed or raced compaction changes nothing and is left to the next commit."""
    runs.update_incremental()
    if len(runs.file_uris()) <= RUNS_FILES_MAX:
        return
    try:
        runs.optimize.compact(writer_properties=WriterProperties(compression="ZSTD"),
                              commit_properties=CommitProperties(max_commit_retries=0))
    except DeltaError:
        pass


def run_committed(atlas_uri: str | os.PathLike, run_id: str, storage_options: dict | None = None) -> bool:
    """Whether the run's rows are in the `neurons` table (its app transaction is in the log)."""
    validate_name("run", run_id)
    dt = _open(table_uri(atlas_uri, NEURONS), delta_options(storage_options))
    return dt is not None and dt.transaction_version(app_id(run_id)) is not None


def run_recorded(atlas_uri: str | os.PathLike, run_id: str, storage_options: dict | None = None) -> bool:
    """Whether the run's row is in the `runs` table (the second of a run's two commits)."""
    validate_name("run", run_id)
    dt = _open(table_uri(atlas_uri, RUNS), delta_options(storage_options))
    return dt is not None and dt.transaction_version(app_id(run_id)) is not None


def committed_runs(atlas_uri: str | os.PathLike, storage_options: dict | None = None) -> set[str]:
    """Run ids of the `runs` table, plus runs of recent `neurons` commits whose runs row is not in yet."""
    options = delta_options(storage_options)
    found: set[str] = set()
    runs = _open(table_uri(atlas_uri, RUNS), options)
    if runs is not None:
        found.update(runs.to_pyarrow_dataset().to_table(columns=["run_id"]).column("run_id").to_pylist())
    neurons = _open(table_uri(atlas_uri, NEURONS), options)
    if neurons is not None:
        # A crash between the two commits leaves a run only here; such a run is a recent commit.
        found.update(c[RUN_KEY_META] for c in neurons.history(limit=100) if RUN_KEY_META in c)
    return found
