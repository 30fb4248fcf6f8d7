"""The streaming reduce: a run's rows (record batches) -> ranked, sorted Parquet data files in the
`neurons` table's directory, not yet committed. Memory is bounded by the largest (concept, method,
ablation) group (its numeric columns), never by the number of rows in the run.

Pass 1 reads the batches once and spills each group's per-neuron columns to a local Arrow file.
Pass 2 takes one group at a time: numeric sort (score descending; NaN, then null, last; ties to the
lower layer, neuron), duplicate check, then writes its rows in rank order with the run's constant
columns (model revision, method, ablation, run id, created_at) added per row group at write time.
One data file per (model, concept), groups in (method, ablation) order, top ranks first.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake.transaction import AddAction

from storage.errors import AtlasError
from storage.schema import ATLAS_SCHEMA, SHARD_SCHEMA, check_keys, check_schema, validate_name

PARTITION_BY = ["model", "concept"]
GROUP = ("concept", "method", "ablation")
CONSTANT = ("model", "model_revision", "run_id")
# What a group spills: the per-neuron columns (everything else is the group's key or the run's constant).
SPILL_COLUMNS = [n for n in SHARD_SCHEMA.names if n not in GROUP + CONSTANT]
SPILL_SCHEMA = pa.schema([SHARD_SCHEMA.field(n) for n in SPILL_COLUMNS])
# A data file holds one partition (model, concept): the partition columns live in the Delta log.
FILE_SCHEMA = pa.schema([f for f in ATLAS_SCHEMA if f.name not in PARTITION_BY])
ROW_GROUP = 16_384  # small row groups: a `rank <= k` read stops at the first one of each block
BATCH_ROWS = 65_536
# Columns whose min/max go into each add action's stats: the readers prune files by run id and rank.
# (No float stats: NaN has no min/max; no timestamp stats: Delta truncates them to milliseconds.)
_STAT_COLUMNS = ("model_revision", "method", "ablation", "run_id", "layer", "neuron", "rank")


@dataclass(frozen=True)
class Block:
    """One ranked group of a run: its rows are ranked 1..rows across all its layers."""

    concept: str
    method: str
    ablation: str
    rows: int


@dataclass
class ReducedRun:
    """The data files of a run, written and not yet committed, and what they hold."""

    model: str
    revision: str
    run_id: str
    created_at: datetime
    rows: int
    layers: list[int]
    blocks: list[Block]
    actions: list[AddAction] = field(repr=False)
    paths: list[str] = field(repr=False)  # on `fs`, for removal when the commit does not happen


class _Spill:
    """Pass 1: one local Arrow file per (concept, method, ablation), plus the run's constants."""

    def __init__(self, directory: str, *, run_id: str, what: str):
        self.directory, self.run_id, self.what = directory, run_id, what
        self.writers: dict[tuple[str, str, str], pa.ipc.RecordBatchFileWriter] = {}
        self.paths: dict[tuple[str, str, str], str] = {}
        self.counts: dict[tuple[str, str, str], int] = {}
        self.model: str | None = None
        self.revision: str | None = None
        self.layers: set[int] = set()
        self.rows = 0

    def _constant(self, table: pa.Table, name: str, seen: str | None) -> str:
        values = pc.unique(table.column(name)).to_pylist()
        if seen is not None and seen not in values:
            values.append(seen)
        if len(values) != 1:
            raise AtlasError(f"{self.what}: a run covers one {name}, got {len(values)}: {sorted(values)[:5]}")
        return values[0]

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if table.num_rows == 0:
            return
        check_schema(table, SHARD_SCHEMA, what=self.what)
        check_keys(table, what=self.what, run_id=self.run_id)
        self.model = self._constant(table, "model", self.model)
        self.revision = self._constant(table, "model_revision", self.revision)
        self.layers.update(pc.unique(table.column("layer")).to_pylist())
        self.rows += table.num_rows
        keys = table.select(list(GROUP)).group_by(list(GROUP), use_threads=False).aggregate([])
        for key in keys.to_pylist():
            group = (key["concept"], key["method"], key["ablation"])
            part = table
            if keys.num_rows > 1:
                mask = pc.and_(pc.and_(pc.equal(table.column("concept"), group[0]),
                                       pc.equal(table.column("method"), group[1])),
                               pc.equal(table.column("ablation"), group[2]))
                part = table.filter(mask)
            self._writer(group).write_table(pa.Table.from_arrays(part.select(SPILL_COLUMNS).columns,
                                                                  schema=SPILL_SCHEMA))
            self.counts[group] += part.num_rows

    def _writer(self, group: tuple[str, str, str]) -> pa.ipc.RecordBatchFileWriter:
        if group not in self.writers:
            validate_name("concept", group[0])
            path = f"{self.directory}/g{len(self.writers):05d}.arrow"
            self.paths[group] = path
            self.counts[group] = 0
            self.writers[group] = pa.ipc.new_file(path, SPILL_SCHEMA)
        return self.writers[group]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {group: None for group in self.writers}  # type: ignore[misc]


def rank_order(layer: np.ndarray, neuron: np.ndarray, score: pa.Array) -> np.ndarray:
    """Row indices in rank order: score descending, NaN then null last, ties to lower (layer, neuron)."""
    valid = np.asarray(pc.is_valid(score).to_numpy(zero_copy_only=False))
    values = np.asarray(pc.fill_null(score, 0.0).to_numpy(zero_copy_only=False))
    nan = np.isnan(values)
    kind = np.where(~valid, 2, np.where(nan, 1, 0)).astype(np.int8)  # 0 number, 1 NaN, 2 null
    key = np.where(kind == 0, -values, 0.0).astype(values.dtype)
    return np.lexsort((neuron, layer, key, kind))  # the last key sorts first


def _duplicates(layer: np.ndarray, neuron: np.ndarray) -> tuple[int, tuple[int, int] | None, int]:
    """(how many neurons appear more than once, the first such (layer, neuron), its count)."""
    keys = np.sort((layer.astype(np.int64) << 32) | (neuron.astype(np.int64) & 0xFFFFFFFF))
    repeated = keys[1:] == keys[:-1]
    if not repeated.any():
        return 0, None, 0
    starts = np.flatnonzero(repeated & np.concatenate(([True], ~repeated[:-1])))
    first = keys[starts[0]]
    count = int(np.count_nonzero(keys == first))
    return len(starts), (int(first >> 32), int(np.int32(first & 0xFFFFFFFF))), count


class _FileStats:
    """Delta add-action stats of one data file, accumulated over the row groups written."""

    def __init__(self):
        self.rows = 0
        self.low: dict[str, object] = {}
        self.high: dict[str, object] = {}
        self.nulls = {name: 0 for name in FILE_SCHEMA.names}

    def update(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        for name in FILE_SCHEMA.names:
            column = table.column(name)
            self.nulls[name] += column.null_count
            if name in _STAT_COLUMNS and column.null_count < len(column):
                bounds = pc.min_max(column).as_py()
                self.low[name] = bounds["min"] if name not in self.low else min(self.low[name], bounds["min"])
                self.high[name] = bounds["max"] if name not in self.high else max(self.high[name], bounds["max"])

    def json(self) -> str:
        return json.dumps({"numRecords": self.rows, "minValues": self.low, "maxValues": self.high,
                           "nullCount": self.nulls})


def _constant_array(value, type_: pa.DataType, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), n)


def _write_partition(fs, root: str, spill: _Spill, concept: str, groups: list[tuple[str, str, str]], *,
                     created_at: datetime, what: str, written: list[str]) -> AddAction:
    """Write one (model, concept) data file from its spilled groups; return its add action."""
    relative = f"model={spill.model}/concept={concept}/part-{spill.run_id}-{uuid.uuid4().hex[:12]}.parquet"
    path = f"{root}/{relative}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    stats = _FileStats()
    written.append(path)
    created_type = FILE_SCHEMA.field("created_at").type
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, FILE_SCHEMA, compression="zstd") as writer:
        for group in groups:
            with pa.memory_map(spill.paths[group], "r") as source:
                rows = pa.ipc.open_file(source).read_all()  # [n] per-neuron columns, mapped, not copied
                n = rows.num_rows
                layer = rows.column("layer").to_numpy()
                neuron = rows.column("neuron").to_numpy()
                count, example, times = _duplicates(layer, neuron)
                if count:
                    raise AtlasError(
                        f"{what}: {count} neurons appear more than once, e.g. (model={spill.model!r}, "
                        f"concept={concept!r}, method={group[1]!r}, ablation={group[2]!r}, layer={example[0]}, "
                        f"neuron={example[1]}) x{times}")
                order = rank_order(layer, neuron, rows.column("score").combine_chunks())
                del layer, neuron
                for start in range(0, n, ROW_GROUP):
                    take = order[start:start + ROW_GROUP]
                    m = len(take)
                    part = rows.take(pa.array(take))
                    columns = {
                        "model_revision": _constant_array(spill.revision, pa.string(), m),
                        "method": _constant_array(group[1], pa.string(), m),
                        "ablation": _constant_array(group[2], pa.string(), m),
                        "run_id": _constant_array(spill.run_id, pa.string(), m),
                        "rank": pa.array(np.arange(start + 1, start + m + 1, dtype=np.int32)),
                        "created_at": _constant_array(created_at, created_type, m),
                    }
                    table = pa.table([columns[name] if name in columns else part.column(name)
                                      for name in FILE_SCHEMA.names], schema=FILE_SCHEMA)
                    stats.update(table)
                    writer.write_table(table, row_group_size=ROW_GROUP)
                del rows, order
    size = fs.size(path)
    return AddAction(relative, size, {"model": spill.model, "concept": concept}, int(time.time() * 1000), True,
                     stats.json())


def reduce_run(batches: Iterable[pa.RecordBatch | pa.Table], *, fs, table_root: str, run_id: str,
               created_at: datetime, what: str, spill_dir: str | None = None) -> ReducedRun:
    """Rank a run's rows and write its data files under `table_root` on `fs` (uncommitted).

    Raises AtlasError (after removing any file it wrote) when the rows are not one valid run:
    wrong schema, null keys, rows of another run, several models or revisions, duplicate neurons.
    """
    scratch = tempfile.mkdtemp(prefix=f"neuron-atlas-reduce-{run_id}-", dir=spill_dir)
    written: list[str] = []
    try:
        spill = _Spill(scratch, run_id=run_id, what=what)
        for batch in batches:
            spill.add(batch)
        spill.close()
        if spill.rows == 0:
            raise AtlasError(f"{what}: no rows to commit")
        validate_name("model", spill.model)
        by_concept: dict[str, list[tuple[str, str, str]]] = {}
        for group in sorted(spill.paths):
            by_concept.setdefault(group[0], []).append(group)
        actions = [_write_partition(fs, table_root, spill, concept, groups, created_at=created_at, what=what,
                                    written=written)
                   for concept, groups in sorted(by_concept.items())]
        blocks = [Block(*group, rows=spill.counts[group]) for group in sorted(spill.paths)]
        return ReducedRun(model=spill.model, revision=spill.revision, run_id=run_id, created_at=created_at,
                          rows=spill.rows, layers=sorted(spill.layers), blocks=blocks, actions=actions,
                          paths=written)
    except BaseException:
        remove_files(fs, written)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_files(fs, paths: list[str]) -> None:
    """Best-effort removal of data files that will not be committed (vacuum catches what this misses)."""
    for path in paths:
        try:
            fs.rm(path)
        except (FileNotFoundError, OSError):
            pass


def table_batches(rows: pa.Table) -> Iterator[pa.RecordBatch]:
    """An in-memory run as record batches for `reduce_run`."""
    yield from rows.to_batches(max_chunksize=BATCH_ROWS)
