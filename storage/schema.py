"""Columns of the atlas tables and the checks every table and name passes before it is stored."""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import AtlasError

# What an actor writes for one shard: one row per (concept, method, ablation, neuron).
SHARD_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("concept", pa.string()),
        ("method", pa.string()),
        ("ablation", pa.string()),
        ("run_id", pa.string()),
        ("layer", pa.int32()),
        ("neuron", pa.int32()),
        ("score", pa.float32()),
        ("effect", pa.float32()),
        ("activation", pa.float32()),
        # Method-specific statistics, null where a method does not compute them (the same names as
        # attribution/neuron_scores.EXTRA_COLUMNS; README "Methods" says what each holds).
        ("act_mean", pa.float32()),
        ("act_std", pa.float32()),
        ("range_low", pa.float32()),
        ("range_high", pa.float32()),
        ("selectivity", pa.float32()),
        ("consistency", pa.float32()),
    ]
)
# Columns added after the first release: an atlas created before them gains them (null for old
# rows) at its next commit, and readers fill them with nulls until then.
STAT_COLUMNS = ("act_mean", "act_std", "range_low", "range_high", "selectivity", "consistency")

# The committed `neurons` table: shard rows plus their rank and the run's commit time.
ATLAS_SCHEMA = SHARD_SCHEMA.append(pa.field("rank", pa.int32())).append(
    pa.field("created_at", pa.timestamp("us", tz="UTC"))
)

# The `runs` table: one row per committed run.
RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("concepts", pa.list_(pa.string())),
        ("methods", pa.list_(pa.string())),
        ("ablations", pa.list_(pa.string())),
        ("rows", pa.int64()),
        ("neurons_version", pa.int64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("metadata_json", pa.string()),
        # What the run holds, so readers pick runs from this table alone: its layers, and each ranked
        # (concept, method, ablation) block with its row count. Null in runs committed before they existed.
        ("layers", pa.list_(pa.int32())),
        ("blocks", pa.list_(pa.struct([("concept", pa.string()), ("method", pa.string()),
                                       ("ablation", pa.string()), ("rows", pa.int64())]))),
    ]
)

# A neuron's identity inside a run; a run holds each at most once.
ROW_KEY = ("model", "concept", "method", "ablation", "layer", "neuron")
# Columns that may never be null: they name a row.
KEY_COLUMNS = ("model", "model_revision", "concept", "method", "ablation", "run_id", "layer", "neuron")

# Names that become part of a path (model, run) or a partition value (concept). Lowercase only, so
# two names never collide on case-insensitive file systems; no "/" and no leading "." so a name can
# never climb out of its directory.
SLUG = r"^[a-z0-9][a-z0-9_.-]{0,127}$"
CONCEPT_SLUG = r"^[a-z0-9][a-z0-9_-]{0,63}$"
# Shard ids are made by the planner (e.g. "neat-royalty-L003-n000000"): upper case allowed.
SHARD_SLUG = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"

_START = "starting with a letter or digit"
_PATTERNS = {
    "concept": (CONCEPT_SLUG, f"lowercase letters, digits, '_' or '-', {_START}, at most 64 characters"),
    "shard": (SHARD_SLUG, f"letters, digits, '_', '.' or '-', {_START}, at most 200 characters"),
}
_DEFAULT = (SLUG, f"lowercase letters, digits, '_', '.' or '-', {_START}, at most 128 characters")


def validate_name(kind: str, value: str) -> str:
    """Return `value` if it is a valid `kind` name ("model", "concept", "run", "shard", ...), else raise."""
    pattern, words = _PATTERNS.get(kind, _DEFAULT)
    if not isinstance(value, str) or re.fullmatch(pattern, value) is None:
        raise AtlasError(f"{kind} {value!r} is not a valid name: expected {words} (pattern {pattern})")
    return value


def shard_table(columns: dict) -> pa.Table:
    """A SHARD_SCHEMA table from column name -> values; absent statistics columns are null."""
    n = len(next(iter(columns.values()))) if columns else 0
    full = {name: columns.get(name, pa.nulls(n, pa.float32())) for name in SHARD_SCHEMA.names}
    unknown = sorted(set(columns) - set(SHARD_SCHEMA.names))
    if unknown:
        raise AtlasError(f"shard rows: unexpected columns {unknown}; expected {SHARD_SCHEMA.names}")
    return pa.table(full, schema=SHARD_SCHEMA)


def conform_to_atlas(table: pa.Table) -> pa.Table:
    """`table` with ATLAS_SCHEMA's columns in order: statistics columns an older atlas lacks become nulls."""
    for name in STAT_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(ATLAS_SCHEMA.field(name), pa.nulls(table.num_rows, pa.float32()))
    return table.select(ATLAS_SCHEMA.names).cast(ATLAS_SCHEMA)


def conform_runs(table: pa.Table) -> pa.Table:
    """`table` with RUNS_SCHEMA's columns in order: columns an older runs table lacks become nulls."""
    for f in RUNS_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(RUNS_SCHEMA.names).cast(RUNS_SCHEMA)


def check_schema(table: pa.Table, expected: pa.Schema, *, what: str) -> None:
    """Raise AtlasError unless `table` has exactly `expected`'s column names, order and types.

    Nullability and field metadata are ignored: they differ between writers for the same data.
    """
    got = [(f.name, f.type) for f in table.schema]
    want = [(f.name, f.type) for f in expected]
    if got == want:
        return
    got_names, want_names = [n for n, _ in got], [n for n, _ in want]
    problems = []
    missing = [n for n in want_names if n not in got_names]
    extra = [n for n in got_names if n not in want_names]
    if missing:
        problems.append(f"missing columns {missing}")
    if extra:
        problems.append(f"unexpected columns {extra}")
    types = dict(got)
    wrong = [f"{n} is {types[n]} (expected {t})" for n, t in want if n in types and types[n] != t]
    if wrong:
        problems.append("wrong types: " + ", ".join(wrong))
    if not problems:
        problems.append(f"columns in order {got_names}, expected {want_names}")
    raise AtlasError(f"{what}: schema does not match: {'; '.join(problems)}")


def check_keys(table: pa.Table, *, what: str, run_id: str | None = None) -> None:
    """Raise AtlasError if a key column holds a null, or a row belongs to a run other than `run_id`."""
    nulls = [name for name in KEY_COLUMNS if table.column(name).null_count]
    if nulls:
        raise AtlasError(f"{what}: null values in key columns {nulls}")
    if run_id is not None:
        others = pc.unique(table.column("run_id")).to_pylist()
        others = sorted(r for r in others if r != run_id)
        if others:
            raise AtlasError(f"{what}: rows carry run_id {others[:5]}, expected only {run_id!r}")
