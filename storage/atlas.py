"""The atlas for notebooks: `Atlas.open(uri)`, then top neurons of a concept, a neuron's passport,
the diff of two runs, or a DuckDB connection / Arrow table for anything else. Reads go through the
Delta log (a version or a time with `as_of`); nothing here writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from storage.errors import AmbiguousModelError, AtlasError, UnknownConceptError
from storage.history import atlas_history
from storage.location import normalize_uri
from storage.read import (AsOf, connect_views, latest_coverage, latest_top, list_runs, open_neurons,
                          run_coverage, top_neurons)
from storage.schema import validate_name

PASSPORT_COLUMNS = ["concept", "method", "ablation", "rank", "score", "effect", "activation", "run_id",
                    "model", "model_revision", "layer", "neuron"]
DIFF_COLUMNS = ["layer", "neuron", "rank_a", "rank_b", "score_a", "score_b", "effect_a", "effect_b"]


def _spearman(rank_a: np.ndarray, rank_b: np.ndarray) -> float:
    """Spearman's rho of two rankings of the same neurons (re-ranked within them; no ties by design)."""
    n = len(rank_a)
    if n < 2:
        return float("nan")
    ra = np.argsort(np.argsort(rank_a, kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(rank_b, kind="stable"), kind="stable").astype(np.float64)
    d = ra - rb
    return float(1.0 - 6.0 * np.dot(d, d) / (n * (n * n - 1.0)))


@dataclass(frozen=True)
class RunDiff:
    """How a concept's ranking moved between two runs: the top-k's newcomers and leavers, and rho."""

    concept: str
    method: str
    ablation: str
    run_a: str
    run_b: str
    k: int
    neurons: int  # neurons ranked in both runs (rho is over these)
    spearman: float
    kept: int  # neurons in both top-k lists
    entered: pa.Table = field(repr=False)  # in run_b's top-k, not in run_a's (DIFF_COLUMNS, by rank_b)
    left: pa.Table = field(repr=False)  # in run_a's top-k, not in run_b's (by rank_a)
    # Neurons in either top-k and ranked in both runs, largest |rank_a - rank_b| first (DIFF_COLUMNS +
    # rank_change = rank_a - rank_b: > 0 rose); used for drift (storage/drift.py).
    movers: pa.Table | None = field(default=None, repr=False)

    def summary(self) -> str:
        return (f"concept {self.concept}, method {self.method}, ablation {self.ablation}: run {self.run_a} -> "
                f"{self.run_b}, top-{self.k}: {self.kept} kept, {self.entered.num_rows} entered, "
                f"{self.left.num_rows} left; Spearman rho {self.spearman:.4f} over {self.neurons:,} neurons")

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("concept", "method", "ablation", "run_a", "run_b", "k", "neurons",
                                             "spearman", "kept")}
        out["spearman"] = None if np.isnan(self.spearman) else self.spearman
        out["entered"] = self.entered.to_pylist()
        out["left"] = self.left.to_pylist()
        return out


class Atlas:
    """A neuron atlas opened for reading. `storage_options` as delta-rs takes them (or None: the
    standard AWS environment and profile chain); kept private, never shown."""

    def __init__(self, uri: str | os.PathLike, storage_options: dict | None = None):
        self.uri = normalize_uri(uri)
        self._storage_options = storage_options

    @classmethod
    def open(cls, uri: str | os.PathLike, storage_options: dict | None = None) -> "Atlas":
        """Open the atlas at a directory or URL; raises AtlasError if nothing was ever committed there."""
        atlas = cls(uri, storage_options)
        if open_neurons(atlas.uri, storage_options) is None:
            raise AtlasError(f"no atlas at {atlas.uri}: it has no neurons table (no run was committed there)")
        return atlas

    def __repr__(self) -> str:
        return f"Atlas({self.uri!r}, version={self.version})"

    @property
    def version(self) -> int:
        """The latest committed version."""
        dt = open_neurons(self.uri, self._storage_options)
        return -1 if dt is None else dt.version()

    def dataset(self, *, as_of: AsOf = None) -> pds.Dataset:
        """The `neurons` rows as a lazy Arrow dataset (filters and column selection push down)."""
        dt = open_neurons(self.uri, self._storage_options, as_of=as_of)
        if dt is None:
            raise AtlasError(f"no atlas at {self.uri}")
        return dt.to_pyarrow_dataset()

    def table(self, *, columns: list[str] | None = None, filter: pds.Expression | None = None,
              run: str | None = None, as_of: AsOf = None) -> pa.Table:
        """`neurons` rows as an Arrow table; narrow with `columns`, a dataset `filter`, or `run`."""
        if run is not None:
            where = pds.field("run_id") == validate_name("run", run)
            filter = where if filter is None else filter & where
        return self.dataset(as_of=as_of).to_table(columns=columns, filter=filter)

    def runs(self, *, as_of: AsOf = None) -> pa.Table:
        """Committed runs with their metadata JSON, newest first."""
        return list_runs(self.uri, self._storage_options, as_of=as_of)

    def history(self) -> pa.Table:
        """Versions, newest first: run, model, revision, concepts, methods, rows, time."""
        return atlas_history(self.uri, self._storage_options)

    def duckdb(self, *, run: str | None = None, as_of: AsOf = None) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with the views `neurons`, `latest` and `runs` (over Arrow; the atlas
        itself cannot be written through it). Close it when done."""
        return connect_views(self.uri, self._storage_options, run_id=run, as_of=as_of)

    def top(self, concept: str, k: int = 20, *, model: str | None = None, method: str = "neat",
            ablation: str | None = None, run: str | None = None, as_of: AsOf = None) -> pa.Table:
        """The k highest-ranked neurons of a concept from its latest run (or `run`), by ablation and rank."""
        return top_neurons(self.uri, concept=concept, model=model, method=method, ablation=ablation, run_id=run,
                           top=k, storage_options=self._storage_options, as_of=as_of)

    def _model(self, dt, model: str | None) -> str:
        models = sorted({p["model"] for p in dt.partitions()})
        if model is None:
            if len(models) > 1:
                raise AmbiguousModelError(f"the atlas at {self.uri} holds several models: {', '.join(models)}; "
                                          "name one (model=... or --model)", models=models)
            return models[0]
        if model not in models:
            raise AtlasError(f"model {model!r} is not in the atlas at {self.uri}; models: {models}")
        return model

    def passport(self, layer: int, neuron: int, *, model: str | None = None, k: int = 100,
                 run: str | None = None, as_of: AsOf = None) -> pa.Table:
        """Every (concept, method, ablation) for which the neuron ranks in the top k of the `latest` view
        (per layer the newest run holding it, ranks across the layers shown) or of `run`, with its rank,
        score, effect, activation and the run each row comes from; best rank first."""
        for name, value in (("layer", layer), ("neuron", neuron)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AtlasError(f"{name} {value!r} must be an integer >= 0")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise AtlasError(f"k {k!r} must be a positive integer")
        if run is not None:
            validate_name("run", run)
        dt = open_neurons(self.uri, self._storage_options, as_of=as_of)
        if dt is None:
            raise AtlasError(f"no atlas at {self.uri}")
        model = self._model(dt, model)
        if run is not None:
            # Files are sorted by rank, so `rank <= k` reads only the first row group of each block.
            data = dt.to_pyarrow_dataset(file_pruning_predicate=[("model", "=", model), ("run_id", "=", run)])
            where = (pds.field("model") == model) & (pds.field("rank") <= k) & (pds.field("run_id") == run)
            top = data.to_table(filter=where)
        else:
            # The latest view: per (concept, method, ablation, layer) the newest run in the runs table,
            # ranks recomputed across the layers shown; only the chosen runs' first row groups are read.
            coverage = run_coverage(list_runs(self.uri, self._storage_options, as_of=as_of), dt)
            coverage = coverage.filter(pc.equal(coverage.column("model"), model))
            top = latest_top(dt, latest_coverage(coverage), k)
        rows = top.filter(pc.and_(pc.equal(top.column("layer"), layer), pc.equal(top.column("neuron"), neuron)))
        rows = rows.sort_by([("rank", "ascending"), ("concept", "ascending"), ("method", "ascending"),
                             ("ablation", "ascending")])
        return rows.select(PASSPORT_COLUMNS)

    def diff(self, run_a: str, run_b: str, concept: str, k: int = 100, *, method: str = "neat",
             ablation: str | None = None) -> RunDiff:
        """Compare a concept's ranking in two runs: neurons entering and leaving the top k, and
        Spearman's rank correlation over every neuron ranked in both."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise AtlasError(f"k {k!r} must be a positive integer")
        validate_name("run", run_a)
        validate_name("run", run_b)
        data = self.dataset()
        where = (pds.field("concept") == concept) & (pds.field("method") == method)
        heads = data.to_table(columns=["run_id", "ablation"], filter=where & (pds.field("rank") == 1))
        held: dict[str, set] = {}
        for h in heads.to_pylist():
            held.setdefault(h["run_id"], set()).add(h["ablation"])
        if not held:
            concepts = sorted({p["concept"] for p in open_neurons(self.uri, self._storage_options).partitions()})
            raise UnknownConceptError(f"concept {concept!r} with method {method!r} is not in the atlas at {self.uri}; "
                                      f"concepts: {', '.join(concepts)}", available=concepts)
        for run in (run_a, run_b):
            if run not in held:
                raise AtlasError(f"run {run!r} has no rows for concept {concept!r}, method {method!r}; "
                                 f"runs that do: {sorted(held)}")
        common = held[run_a] & held[run_b]
        if ablation is None:
            if len(common) != 1:
                raise AtlasError(f"runs {run_a!r} and {run_b!r} share ablations {sorted(common)}: name one with "
                                 "ablation=...")
            ablation = next(iter(common))
        elif ablation not in common:
            raise AtlasError(f"ablation {ablation!r} is not in both runs; they share {sorted(common)}")
        where &= pds.field("ablation") == ablation
        columns = ["layer", "neuron", "rank", "score", "effect"]
        sides = []
        for run, tag in ((run_a, "a"), (run_b, "b")):
            side = data.to_table(columns=columns, filter=where & (pds.field("run_id") == run))
            sides.append(side.rename_columns(["layer", "neuron"] + [f"{c}_{tag}" for c in columns[2:]]))
        both = sides[0].join(sides[1], keys=["layer", "neuron"], join_type="full outer")
        rank_a, rank_b = both.column("rank_a"), both.column("rank_b")
        in_both = pc.and_(pc.is_valid(rank_a), pc.is_valid(rank_b))
        shared = both.filter(in_both)
        rho = _spearman(shared.column("rank_a").to_numpy(), shared.column("rank_b").to_numpy())
        top_a = pc.fill_null(pc.less_equal(rank_a, k), False)
        top_b = pc.fill_null(pc.less_equal(rank_b, k), False)
        entered = both.filter(pc.and_(top_b, pc.invert(top_a))).sort_by("rank_b").select(DIFF_COLUMNS)
        left = both.filter(pc.and_(top_a, pc.invert(top_b))).sort_by("rank_a").select(DIFF_COLUMNS)
        kept = pc.sum(pc.and_(top_a, top_b).cast(pa.int64())).as_py() or 0
        moved = both.filter(pc.and_(in_both, pc.or_(top_a, top_b))).select(DIFF_COLUMNS)
        change = pc.subtract(moved.column("rank_a"), moved.column("rank_b"))
        moved = moved.append_column("rank_change", change).append_column("size", pc.abs(change))
        movers = moved.sort_by([("size", "descending"), ("rank_b", "ascending")]).drop_columns(["size"])
        return RunDiff(concept=concept, method=method, ablation=ablation, run_a=run_a, run_b=run_b, k=k,
                       neurons=shared.num_rows, spearman=rho, kept=kept, entered=entered, left=left,
                       movers=movers)
