"""Rank a run's rows and commit them to the atlas as one Delta version, exactly once per run id.

Idempotence: each commit carries the Delta app transaction ("neuron-atlas:<run_id>", v), where v is
the table version the commit lands at (commits are attempted with no automatic retry, so the version
cannot shift under it). A run whose transaction is recorded is never written again, and `v` tells its
version without the commit history, which log clean-up eventually drops.
"""
from __future__ import annotations

import json
import os
import random
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.transaction import CommitProperties, Transaction

from storage.errors import AtlasError, CommitRaceError
from storage.location import NEURONS, RUNS, delta_options, normalize_uri, secret_values, table_uri
from storage.schema import ATLAS_SCHEMA, ROW_KEY, RUNS_SCHEMA, SHARD_SCHEMA, check_keys, check_schema, validate_name

APP_ID = "neuron-atlas"
# Partitioned by model and concept: a top-neurons read opens only its concept's files, and the
# concepts and models on offer come from the log's partition values without reading data.
PARTITION_BY = ["model", "concept"]
# Within a partition rows go (method, ablation, rank): small row groups let a `rank <= k` read stop
# at the first row group of each block (Parquet min/max statistics).
WRITER = WriterProperties(max_row_group_size=16_384, compression="ZSTD")
RUN_KEY_META = "neuron_atlas.run_id"
_GROUP = ["model", "concept", "method", "ablation", "run_id"]
_ATTEMPTS = 8  # commits lost to concurrent writers before giving up


def app_id(run_id: str) -> str:
    """The Delta app transaction id that marks a run as committed (in both tables)."""
    return f"{APP_ID}:{run_id}"


def rank_rows(table: pa.Table) -> pa.Table:
    """Add `rank` (int32, 1 = highest score) within (model, concept, method, ablation, run_id).

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


def _create(uri: str, schema: pa.Schema, *, partition_by: list[str] | None, options: dict | None) -> None:
    """Create the empty table (version 0) unless it exists; losing a creation race is fine.

    No commit retries: a retried create lands as a second CREATE TABLE version (new table id) when
    two writers race to create the atlas (seen with delta-rs 1.6 on S3).
    """
    try:
        DeltaTable.create(uri, schema, mode="ignore", partition_by=partition_by, storage_options=options,
                          commit_properties=CommitProperties(max_commit_retries=0))
    except DeltaError as e:
        if _open(uri, options) is None:
            raise AtlasError(f"cannot create the atlas table {uri}: {e}") from e


def _single(rows: pa.Table, name: str, what: str) -> str:
    values = pc.unique(rows.column(name)).to_pylist()
    if len(values) != 1:
        raise AtlasError(f"{what}: a run covers one {name}, got {len(values)}: {sorted(values)[:5]}")
    return values[0]


def _sorted_unique(rows: pa.Table, name: str) -> list[str]:
    return sorted(pc.unique(rows.column(name)).to_pylist())


def _check_unique(rows: pa.Table, what: str) -> None:
    counts = rows.group_by(list(ROW_KEY)).aggregate([([], "count_all")])
    dups = counts.filter(pc.greater(counts.column("count_all"), 1))
    if dups.num_rows:
        shown = [
            "(" + ", ".join(f"{k}={v!r}" for k, v in row.items() if k != "count_all") + f") x{row['count_all']}"
            for row in dups.slice(0, 3).to_pylist()
        ]
        raise AtlasError(f"{what}: {dups.num_rows} neurons appear more than once, e.g. {'; '.join(shown)}")


def _metadata_json(metadata: dict, run_id: str) -> str:
    if not isinstance(metadata, dict):
        raise AtlasError(f"metadata of run {run_id!r} must be a dict, got {type(metadata).__name__}")
    try:
        # Delta commit info is JSON: NaN and Infinity are not representable there.
        return json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise AtlasError(f"metadata of run {run_id!r} is not JSON (plain values, no NaN/Infinity): {e}") from e


def _commit_once(uri: str, data: pa.Table, *, app: str, options: dict | None, partition_by: list[str] | None,
                 custom: dict, what: str) -> tuple[int, bool]:
    """Append `data` as one commit tagged with `app` unless one is recorded: (its version, written now)."""
    for attempt in range(_ATTEMPTS):
        if attempt:
            time.sleep(random.uniform(0, 0.02 * attempt))  # jitter: racing drivers stop colliding in step
        dt = DeltaTable(uri, storage_options=options)
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
            # merge: an atlas created before the statistics columns existed gains them (null for its old rows).
            write_deltalake(dt, data, mode="append", partition_by=partition_by, writer_properties=WRITER,
                            commit_properties=props, schema_mode="merge")
            return version, True
        except CommitFailedError:
            continue  # another writer took `version` (maybe this very run): re-read the log
        except DeltaError as e:
            raise AtlasError(f"cannot commit {what} to {uri}: {e}") from e
    raise CommitRaceError(f"cannot commit {what} to {uri}: {_ATTEMPTS} attempts lost to concurrent commits; "
                          "run it again")


def _run_created_at(neurons_uri: str, run_id: str, options: dict | None) -> datetime:
    dt = DeltaTable(neurons_uri, storage_options=options)
    found = dt.to_pyarrow_dataset().to_table(
        columns=["created_at"], filter=(pds.field("run_id") == run_id) & (pds.field("rank") == 1)
    )
    return found.column("created_at")[0].as_py()


def commit_run(
    atlas_uri: str | os.PathLike,
    rows: pa.Table,
    *,
    run_id: str,
    metadata: dict,
    storage_options: dict | None = None,
) -> int:
    """Rank a whole run's rows (SHARD_SCHEMA) and commit them as one `neurons` version; return it.

    Committing a run id again changes nothing and returns the version of the first commit. Afterwards
    one row goes to the `runs` table (also once per run id). Validation happens before any write, and
    a failed commit leaves readers on the previous version.
    """
    validate_name("run", run_id)
    what = f"rows of run {run_id!r}"
    check_schema(rows, SHARD_SCHEMA, what=what)
    if rows.num_rows == 0:
        raise AtlasError(f"{what}: no rows to commit")
    check_keys(rows, what=what, run_id=run_id)
    model = validate_name("model", _single(rows, "model", what))
    revision = _single(rows, "model_revision", what)
    concepts = [validate_name("concept", c) for c in _sorted_unique(rows, "concept")]
    _check_unique(rows, what)
    metadata_json = _metadata_json(metadata, run_id)
    if any(secret in metadata_json for secret in secret_values(storage_options)):
        # The metadata goes into the commit log and the runs table, readable by anyone who reads the atlas.
        raise AtlasError(f"metadata of run {run_id!r} contains a credential from storage_options; "
                         "redact it (storage.location.redact_options) before committing")

    uri = normalize_uri(atlas_uri)
    try:
        return _commit_checked(uri, rows, run_id=run_id, model=model, revision=revision, concepts=concepts,
                               metadata_json=metadata_json, storage_options=storage_options)
    except (OSError, DeltaError) as e:  # the store failed (went away, refused): readers keep the last version
        raise AtlasError(f"cannot commit run {run_id!r} to {uri}: {type(e).__name__}: {e}") from e


def _commit_checked(uri: str, rows: pa.Table, *, run_id: str, model: str, revision: str, concepts: list[str],
                    metadata_json: str, storage_options: dict | None) -> int:
    options = delta_options(storage_options)
    neurons_uri = table_uri(uri, NEURONS)
    app = app_id(run_id)
    _create(neurons_uri, ATLAS_SCHEMA, partition_by=PARTITION_BY, options=options)
    version = DeltaTable(neurons_uri, storage_options=options).transaction_version(app)
    wrote = False
    if version is None:
        created_at = datetime.now(timezone.utc)  # one timestamp for the whole run
        created_type = ATLAS_SCHEMA.field("created_at").type
        data = rank_rows(rows).append_column(
            ATLAS_SCHEMA.field("created_at"), pa.repeat(pa.scalar(created_at, created_type), rows.num_rows)
        )
        # userMetadata is the commit-info field that Spark and Databricks show in DESCRIBE HISTORY.
        custom = {"userMetadata": metadata_json, RUN_KEY_META: run_id}
        version, wrote = _commit_once(neurons_uri, data, app=app, options=options, partition_by=PARTITION_BY,
                                      custom=custom, what=f"run {run_id!r}")
    runs_uri = table_uri(uri, RUNS)
    _create(runs_uri, RUNS_SCHEMA, partition_by=None, options=options)
    if not wrote:
        if DeltaTable(runs_uri, storage_options=options).transaction_version(app) is not None:
            return version
        created_at = _run_created_at(neurons_uri, run_id, options)  # it landed without its runs row

    runs_row = pa.Table.from_pylist(
        [{
            "run_id": run_id,
            "model": model,
            "model_revision": revision,
            "concepts": concepts,
            "methods": _sorted_unique(rows, "method"),
            "ablations": _sorted_unique(rows, "ablation"),
            "rows": rows.num_rows,
            "neurons_version": version,
            "created_at": created_at,
            "metadata_json": metadata_json,
        }],
        schema=RUNS_SCHEMA,
    )
    _commit_once(runs_uri, runs_row, app=app, options=options, partition_by=None,
                 custom={RUN_KEY_META: run_id}, what=f"the runs row of run {run_id!r}")
    return version


def run_committed(atlas_uri: str | os.PathLike, run_id: str, storage_options: dict | None = None) -> bool:
    """Whether the run's rows are in the `neurons` table (its app transaction is in the log)."""
    validate_name("run", run_id)
    dt = _open(table_uri(atlas_uri, NEURONS), delta_options(storage_options))
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
