"""Streamed command output: Arrow record batches to CSV or JSON as they arrive, in constant memory.

CSV: one header, RFC 4180 quoting where needed, list and struct values as JSON, times as ISO 8601.
JSON: one array of row objects, written batch by batch.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv


def _nested(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind) \
        or pa.types.is_struct(kind) or pa.types.is_map(kind)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def csv_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with the columns CSV cannot hold as they are made into strings: nested values as JSON
    (not Python reprs), timestamps as ISO 8601 (2026-12-02T10:00:00.000000Z)."""
    columns, changed = [], False
    for column in batch.columns:
        if _nested(column.type):
            column = pa.array([None if v is None else json.dumps(_jsonable(v)) for v in column.to_pylist()],
                              pa.string())
            changed = True
        elif pa.types.is_timestamp(column.type):
            column = pc.replace_substring(column.cast(pa.string()), " ", "T", max_replacements=1)
            changed = True
        elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            column = pa.array([None if v is None else v.hex() for v in column.to_pylist()], pa.string())
            changed = True
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names) if changed else batch


def write_csv_batches(schema: pa.Schema, batches: Iterable[pa.RecordBatch], stream) -> int:
    """Write `batches` as CSV to the text `stream` (header once); returns the number of rows written."""
    rows, first = 0, True
    for batch in _with_empty(schema, batches):
        text = _csv_rows(csv_ready(batch))
        if first:  # Arrow quotes every header name; the csv module quotes only where needed
            header = io.StringIO()
            csv.writer(header, lineterminator="\n").writerow(schema.names)
            text = header.getvalue().encode() + text
            first = False
        if hasattr(stream, "buffer"):  # stdout: bytes straight to its buffer, after any text before them
            stream.flush()
            stream.buffer.write(text)
            stream.buffer.flush()
        else:
            stream.write(text.decode())
        rows += batch.num_rows
    return rows


def _csv_rows(batch: pa.RecordBatch) -> bytes:
    """The batch's rows as CSV bytes, quoted only where a value needs it (RFC 4180). Arrow writes
    fast but quotes every string; it writes them bare only when none needs quotes, else the csv module."""
    sink = pa.BufferOutputStream()
    try:
        pacsv.write_csv(batch, sink, write_options=pacsv.WriteOptions(quoting_style="none", include_header=False))
        return sink.getvalue().to_pybytes()
    except pa.ArrowInvalid:  # a value holds a comma, quote or line break
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(
            ["" if v is None else ("true" if v else "false") if isinstance(v, bool) else v for v in row]
            for row in zip(*(c.to_pylist() for c in batch.columns)))
        return out.getvalue().encode()


def _with_empty(schema: pa.Schema, batches: Iterable[pa.RecordBatch]):
    """The batches, or one empty batch of `schema` when there are none (so CSV still gets its header)."""
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        yield pa.RecordBatch.from_pylist([], schema=schema)


def write_json_batches(schema: pa.Schema, batches: Iterable[pa.RecordBatch], stream) -> int:
    """Write `batches` as one JSON array of row objects; returns the number of rows written."""
    rows = 0
    stream.write("[")
    for batch in batches:
        for row in batch.to_pylist():
            stream.write(("," if rows else "") + json.dumps({k: _jsonable(v) for k, v in row.items()}))
            rows += 1
        stream.flush()
    stream.write("]\n")
    return rows
