"""Per-shard Parquet files under `<atlas>/_staging/<run_id>/`, written atomically at deterministic names.

A retried shard rewrites its own file, so staging is at-least-once without duplicates; readers of the
atlas never see these files (they read through the Delta log).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import AtlasError
from storage.location import atlas_filesystem, normalize_uri, staging_dir
from storage.schema import SHARD_SCHEMA, check_keys, check_schema, validate_name

_SUFFIX = ".parquet"


def _shard_path(directory: str, shard_id: str) -> str:
    return f"{directory}/{shard_id}{_SUFFIX}"


def write_shard(
    table: pa.Table,
    atlas_uri: str | os.PathLike,
    *,
    run_id: str,
    shard_id: str,
    storage_options: dict | None = None,
) -> str:
    """Stage one shard's rows (SHARD_SCHEMA) as `_staging/<run_id>/<shard_id>.parquet`; return its URI."""
    validate_name("run", run_id)
    validate_name("shard", shard_id)
    what = f"shard {shard_id!r} of run {run_id!r}"
    check_schema(table, SHARD_SCHEMA, what=what)
    check_keys(table, what=what, run_id=run_id)
    fs, root = atlas_filesystem(atlas_uri, storage_options)
    directory = staging_dir(root, run_id)
    fs.makedirs(directory, exist_ok=True)
    final = _shard_path(directory, shard_id)
    # A dot-name in the same directory: never listed as a shard, and the move stays on one device.
    # The move replaces a previous attempt's file whole, so a reader sees the old or the new file.
    temp = f"{directory}/.{shard_id}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open(temp, "wb") as f:
            pq.write_table(table.replace_schema_metadata(None), f, compression="zstd")
        fs.mv(temp, final)
    except BaseException:
        if fs.exists(temp):
            fs.rm(temp)
        raise
    return f"{normalize_uri(atlas_uri)}/_staging/{run_id}/{shard_id}{_SUFFIX}"


def staged_shards(
    atlas_uri: str | os.PathLike, *, run_id: str, storage_options: dict | None = None
) -> dict[str, int]:
    """shard_id -> row count of the run's whole staged shards (readable footer, SHARD_SCHEMA).

    Temp files and truncated or foreign files are left out: the driver recomputes those shards.
    """
    validate_name("run", run_id)
    fs, root = atlas_filesystem(atlas_uri, storage_options)
    directory = staging_dir(root, run_id)
    fs.invalidate_cache(directory)  # object stores cache listings; a resume must see the latest
    try:
        paths = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return {}
    shards: dict[str, int] = {}
    for path in sorted(paths):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".") or not name.endswith(_SUFFIX):
            continue
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException):  # truncated: no footer, or a footer that lies
            continue
        if [(x.name, x.type) for x in schema] != [(x.name, x.type) for x in SHARD_SCHEMA]:
            continue
        shards[name[: -len(_SUFFIX)]] = meta.num_rows
    return shards


def read_staged(
    atlas_uri: str | os.PathLike,
    *,
    run_id: str,
    shard_ids: list[str],
    storage_options: dict | None = None,
) -> pa.Table:
    """The rows of the given staged shards of a run, concatenated in the order of `shard_ids`."""
    validate_name("run", run_id)
    fs, root = atlas_filesystem(atlas_uri, storage_options)
    directory = staging_dir(root, run_id)
    tables = []
    for shard_id in shard_ids:
        path = _shard_path(directory, validate_name("shard", shard_id))
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError:
            raise AtlasError(f"shard {shard_id!r} of run {run_id!r} is not staged: no file {path}") from None
        except (OSError, pa.ArrowException) as e:
            raise AtlasError(f"shard {shard_id!r} of run {run_id!r} is unreadable ({path}): {e}") from e
        check_schema(table, SHARD_SCHEMA, what=f"staged shard {path}")
        tables.append(table.replace_schema_metadata(None))
    if not tables:
        return SHARD_SCHEMA.empty_table()
    return pa.concat_tables(tables).combine_chunks()


def iter_staged(
    atlas_uri: str | os.PathLike,
    *,
    run_id: str,
    shard_ids: list[str],
    storage_options: dict | None = None,
    batch_rows: int = 65_536,
) -> Iterator[pa.RecordBatch]:
    """The rows of the given staged shards as record batches, one file open at a time (bounded memory)."""
    validate_name("run", run_id)
    fs, root = atlas_filesystem(atlas_uri, storage_options)
    directory = staging_dir(root, run_id)
    for shard_id in shard_ids:
        path = _shard_path(directory, validate_name("shard", shard_id))
        try:
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                check_schema(parquet.schema_arrow.empty_table(), SHARD_SCHEMA, what=f"staged shard {path}")
                yield from parquet.iter_batches(batch_size=batch_rows)
        except FileNotFoundError:
            raise AtlasError(f"shard {shard_id!r} of run {run_id!r} is not staged: no file {path}") from None
        except (OSError, pa.ArrowException) as e:
            raise AtlasError(f"shard {shard_id!r} of run {run_id!r} is unreadable ({path}): {e}") from e


def delete_staging(atlas_uri: str | os.PathLike, *, run_id: str, storage_options: dict | None = None) -> None:
    """Remove a run's staging directory (after its commit); a missing directory is fine."""
    validate_name("run", run_id)
    fs, root = atlas_filesystem(atlas_uri, storage_options)
    directory = staging_dir(root, run_id)
    fs.invalidate_cache(directory)
    if fs.exists(directory):
        fs.rm(directory, recursive=True)


_PLAN_MARK = "_plan.json"  # not a shard: staged_shards lists only *.parquet


def claim_staging(atlas_uri: str | os.PathLike, *, run_id: str, fingerprint: str,
                  storage_options: dict | None = None) -> bool:
    """Record which plan a run's staged shards belong to; True when shards of it may already be staged.

    Raises AtlasError when the run id already holds shards of a different plan (another config, model
    revision or concept file): resuming them would mix two computations in one run.
    """
    import json

    validate_name("run", run_id)
    fs, root = atlas_filesystem(atlas_uri, storage_options)
    directory = staging_dir(root, run_id)
    mark = f"{directory}/{_PLAN_MARK}"
    fs.invalidate_cache(directory)
    if fs.exists(mark):
        with fs.open(mark, "rb") as f:
            found = json.loads(f.read().decode()).get("fingerprint")
        if found != fingerprint:
            raise AtlasError(
                f"run {run_id!r} has staged shards of a different plan in {normalize_uri(atlas_uri)}/_staging/{run_id} "
                f"(plan {found}, this config {fingerprint}): the config, model or concept file changed; "
                f"resume with the same config, or choose another --run-id"
            )
        return True
    fs.makedirs(directory, exist_ok=True)
    with fs.open(mark, "wb") as f:
        f.write(json.dumps({"run_id": run_id, "fingerprint": fingerprint}).encode())
    return False
