"""The atlas's `validations` table: one row per (run, concept, method, ablation, k) validation.

Appended, never rewritten: each `neuron-atlas validate` is its own Delta commit, and readers see the
newest row per key through the Delta log.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from storage.location import delta_options, table_uri
from storage.schema import check_schema, validate_name

VALIDATIONS = "validations"
VALIDATION_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model", pa.string()), ("concept", pa.string()), ("method", pa.string()),
    ("ablation", pa.string()), ("k", pa.int32()),
    ("top_change", pa.float64()),  # log p(T | top-k ablated together) - log p(T)
    ("random_mean", pa.float64()), ("random_std", pa.float64()), ("z_score", pa.float64()),
    ("p_value", pa.float64()), ("draws", pa.int32()),
    ("other_changes_json", pa.string()),  # {"other concept": its change}
    ("neutral_loss_change", pa.float64()),  # next-token loss on neutral text, ablated - clean (nats)
    ("created_at", pa.timestamp("us", tz="UTC")),
    # Added later (an older table gains them at its next append; null for its old rows):
    ("intervention", pa.string()),  # what the ablated neurons were set to: zero | mean | range
    ("prompt_change", pa.float64()),  # mean log p(gold | prompt) over the concept's prompts, ablated - clean
    ("prompt_random_mean", pa.float64()),  # the same for the random draws
    ("shared_top_k", pa.float64()),  # share of the top-k that are also top-k for another concept of the run
    ("specificity", pa.float64()),  # |top_change| / the largest |change| of another panel concept
    ("panel", pa.int32()),  # how many other concepts the panel held (the run's, the reference set, --panel)
    ("prompt_specificity", pa.float64()),  # |prompt_change| / the largest |change| on a panel concept's prompts
    ("prompt_other_changes_json", pa.string()),  # {"panel concept": change of mean log p(gold) on its prompts}
])
_LATER = ("intervention", "prompt_change", "prompt_random_mean", "shared_top_k", "specificity", "panel",
          "prompt_specificity", "prompt_other_changes_json")


def append_validations(atlas_uri: str | os.PathLike, rows: pa.Table, *, storage_options: dict | None = None) -> int:
    """Append validation rows as one commit; returns the table version."""
    check_schema(rows, VALIDATION_SCHEMA, what="validation rows")
    for name in ("run_id", "model", "concept"):
        for value in set(rows.column(name).to_pylist()):
            validate_name(name, value)
    uri = table_uri(atlas_uri, VALIDATIONS)
    write_deltalake(uri, rows, mode="append", storage_options=delta_options(storage_options), schema_mode="merge")
    return DeltaTable(uri, storage_options=delta_options(storage_options)).version()


def read_validations(atlas_uri: str | os.PathLike, *, concept: str | None = None,
                     storage_options: dict | None = None) -> pa.Table:
    """All validation rows (newest first), optionally of one concept; empty when none yet."""
    try:
        table = DeltaTable(table_uri(atlas_uri, VALIDATIONS), storage_options=delta_options(storage_options))
    except TableNotFoundError:
        return VALIDATION_SCHEMA.empty_table()
    rows = table.to_pyarrow_table()
    for name in _LATER:
        if name not in rows.column_names:
            rows = rows.append_column(VALIDATION_SCHEMA.field(name), pa.nulls(rows.num_rows, VALIDATION_SCHEMA.field(name).type))
    rows = rows.select(VALIDATION_SCHEMA.names)
    if concept is not None:
        rows = rows.filter(pc.equal(rows["concept"], concept))
    return rows.sort_by([("created_at", "descending"), ("k", "ascending")])
