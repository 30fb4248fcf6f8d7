"""The atlas's versions (one per committed run, plus table creation and vacuums) and clean-up of
files that no version references: a crashed writer's data files and stale staging directories.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import pyarrow as pa
from deltalake.exceptions import DeltaError

from storage.commit import RUN_KEY_META, run_committed, run_recorded
from storage.errors import AtlasError
from storage.location import NEURONS, RUNS, STAGING, atlas_filesystem, normalize_uri
from storage.read import _open, list_runs, open_neurons
from storage.schema import SLUG

HISTORY_SCHEMA = pa.schema(
    [
        ("version", pa.int64()),
        ("time", pa.timestamp("ms", tz="UTC")),
        ("operation", pa.string()),
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("concepts", pa.list_(pa.string())),
        ("methods", pa.list_(pa.string())),
        ("ablations", pa.list_(pa.string())),
        ("rows", pa.int64()),
    ]
)
# Longer than any job: a writer's data files sit unreferenced until its commit lands, and staged
# shards until the run commits. Delta's own default (delta.deletedFileRetentionDuration) is 7 days.
DEFAULT_RETENTION_HOURS = 168


def atlas_history(
    atlas_uri: str | os.PathLike, storage_options: dict | None = None, *, limit: int | None = None
) -> pa.Table:
    """Versions of the `neurons` table, newest first (HISTORY_SCHEMA), as far back as the log goes.

    A run's version names its run, model, revision, concepts, methods, ablations and rows; other
    versions (CREATE TABLE, VACUUM START/END) leave those empty. Any version can be read back with
    `as_of=version` (`--as-of` in the CLI).
    """
    uri = normalize_uri(atlas_uri)
    neurons = open_neurons(uri, storage_options)
    if neurons is None:
        return HISTORY_SCHEMA.empty_table()
    runs = {r["run_id"]: r for r in list_runs(uri, storage_options).to_pylist()}
    rows = []
    for commit in neurons.history(limit):
        run_id = commit.get(RUN_KEY_META)
        run = runs.get(run_id, {})
        added = (commit.get("operationMetrics") or {}).get("num_added_rows")
        rows.append({
            "version": commit["version"],
            "time": datetime.fromtimestamp(commit["timestamp"] / 1000, tz=timezone.utc),
            "operation": commit.get("operation"),
            "run_id": run_id,
            "model": run.get("model"),
            "model_revision": run.get("model_revision"),
            "concepts": run.get("concepts"),
            "methods": run.get("methods"),
            "ablations": run.get("ablations"),
            "rows": run.get("rows", added if run_id else None),
        })
    rows.sort(key=lambda r: r["version"], reverse=True)
    return pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)


@dataclass(frozen=True)
class VacuumReport:
    """What `vacuum_atlas` removed (or, on a dry run, would remove)."""

    atlas: str
    dry_run: bool
    retention_hours: int
    neurons_files: tuple[str, ...]  # relative to the table
    runs_files: tuple[str, ...]
    staging_runs: tuple[str, ...]  # run ids whose `_staging/<run>` directory goes

    def as_dict(self) -> dict:
        return asdict(self)


def _modified(info: dict) -> float | None:
    """Seconds since the epoch at which a file was last written, from an fsspec `info` entry."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _stale_staging(uri: str, storage_options: dict | None, cutoff: float) -> tuple[list[str], object, str]:
    """Run ids under `_staging/` that are committed, or whose newest file is older than `cutoff`."""
    fs, root = atlas_filesystem(uri, storage_options)
    base = f"{root}/{STAGING}"
    fs.invalidate_cache(base)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return [], fs, base
    stale = []
    for entry in entries:
        run_id = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or re.fullmatch(SLUG, run_id) is None:
            continue  # not a run's staging directory: not ours to remove
        files = fs.find(entry["name"], detail=True, withdirs=False)
        times = [t for t in (_modified(info) for info in files.values()) if t is not None]
        own = _modified(entry)
        newest = max(times + ([own] if own is not None else []), default=None)
        # A run committed to `neurons` without its runs row keeps its staged record for the repair.
        done = run_committed(uri, run_id, storage_options) and run_recorded(uri, run_id, storage_options)
        if done or (newest is not None and newest < cutoff):
            stale.append(run_id)
    return stale, fs, base


def vacuum_atlas(
    atlas_uri: str | os.PathLike,
    *,
    retention_hours: int = DEFAULT_RETENTION_HOURS,
    dry_run: bool = False,
    storage_options: dict | None = None,
) -> VacuumReport:
    """Remove files no atlas version references and older than `retention_hours`, and stale staging.

    Tables only grow (runs are appended), so every committed data file stays referenced and is never
    removed; what goes is a crashed or losing writer's data files (Delta "full" vacuum, by file age)
    and `_staging/<run>` directories of committed runs or with no file newer than the retention.
    The retention must exceed the longest job: a running writer's files look just like orphans.
    """
    if isinstance(retention_hours, bool) or not isinstance(retention_hours, int) or retention_hours < 0:
        raise AtlasError(f"retention hours {retention_hours!r} must be a whole number >= 0")
    uri = normalize_uri(atlas_uri)
    removed: dict[str, tuple[str, ...]] = {}
    for name in (NEURONS, RUNS):
        dt = _open(uri, name, storage_options)
        if dt is None:
            removed[name] = ()
            continue
        try:
            files = dt.vacuum(retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False,
                              full=True)
        except (DeltaError, OSError) as e:
            raise AtlasError(f"cannot vacuum the atlas table {uri}/{name}: {e}") from e
        removed[name] = tuple(sorted(files))
    stale, fs, base = _stale_staging(uri, storage_options, time.time() - retention_hours * 3600)
    if not dry_run:
        for run_id in stale:
            try:
                fs.rm(f"{base}/{run_id}", recursive=True)
            except FileNotFoundError:
                pass  # its driver removed it first
    return VacuumReport(atlas=uri, dry_run=dry_run, retention_hours=retention_hours,
                        neurons_files=removed[NEURONS], runs_files=removed[RUNS], staging_runs=tuple(sorted(stale)))


@dataclass(frozen=True)
class OptimizeReport:
    """What `optimize_atlas` did to each table: files compacted into fewer, and the checkpoint version."""

    atlas: str
    neurons: dict
    runs: dict

    def as_dict(self) -> dict:
        return asdict(self)


def optimize_atlas(atlas_uri: str | os.PathLike, *, storage_options: dict | None = None) -> OptimizeReport:
    """Compact each table's small files (one per run and concept) into larger ones and write a checkpoint.

    Rows do not change (a compaction commit adds no data), so every reader sees the same rows before
    and after, and older versions stay readable by time travel until `vacuum` removes their files.
    Rank order inside files is kept (compaction preserves the order of rows within each partition)
    and the files keep rank-sorted 16,384-row groups, so `rank <= k` reads stay cheap. The Delta
    protocol stays at reader 1 / writer 2: no deletion vectors, no column mapping.
    """
    from storage.commit import TABLE_CONFIG, WRITER

    uri = normalize_uri(atlas_uri)
    done: dict[str, dict] = {}
    for name in (NEURONS, RUNS):
        dt = _open(uri, name, storage_options)
        if dt is None:
            done[name] = {"files_removed": 0, "files_added": 0, "checkpoint_version": None}
            continue
        try:
            if dt.metadata().configuration.get("delta.checkpointInterval") is None:  # an atlas from before
                dt.alter.set_table_properties(TABLE_CONFIG)
            metrics = dt.optimize.compact(writer_properties=WRITER)
            dt = _open(uri, name, storage_options)
            dt.create_checkpoint()
        except (DeltaError, OSError) as e:
            raise AtlasError(f"cannot optimize the atlas table {uri}/{name}: {e}") from e
        done[name] = {"files_removed": metrics.get("numFilesRemoved", 0), "files_added": metrics.get("numFilesAdded", 0),
                      "checkpoint_version": dt.version()}
    return OptimizeReport(atlas=uri, neurons=done[NEURONS], runs=done[RUNS])
