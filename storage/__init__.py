"""The neuron atlas: a Delta Lake table of every neuron's score, on a directory or an fsspec URL.

Modules: `schema` (columns, name checks), `location` (paths), `staging` (per-shard Parquet),
`commit` (rank and commit a run as one Delta version), `read` (top neurons, runs, read-only SQL).
"""
