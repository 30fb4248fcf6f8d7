"""Benchmark: query latency on a large synthetic atlas on local disk (the 70B-model scale by default).

Builds (or reuses) an atlas of layers x d_mlp neurons x concepts rows, committed the way runs are (one
run per concept, ranked, partitioned by model and concept, sorted by rank), then times, each from a
fresh read of the Delta log as a CLI call does: top-20 of one concept, one neuron's passport (every
concept it ranks top-100 for), and a full-table aggregate in DuckDB.

Usage: python benchmarks/bench_atlas.py [--atlas DIR] [--layers 80] [--d-mlp 28672] [--concepts 44]
       [--repeat 3] [--json]          # defaults: 2,293,760 neurons x 44 concepts = 100.9M rows
       python benchmarks/bench_atlas.py --small   # 80 x 2,867 x 44 = 10.1M rows, for a quick look
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from storage.atlas import Atlas  # noqa: E402
from storage.commit import commit_run  # noqa: E402
from storage.read import list_runs, sql_query, top_neurons  # noqa: E402
from storage.schema import shard_table  # noqa: E402

MODEL = "synthetic-70b"


def concept_rows(concept: str, run_id: str, layers: int, d_mlp: int, seed: int) -> pa.Table:
    """One run's rows for one concept: every neuron, heavy-tailed effects (a few neurons matter)."""
    rng = np.random.default_rng(seed)
    n = layers * d_mlp
    effect = (rng.standard_t(3, size=n) * 0.05).astype(np.float32)
    return shard_table(
        {
            "model": pa.repeat(pa.scalar(MODEL), n),
            "model_revision": pa.repeat(pa.scalar("sha256:0000synthetic"), n),
            "concept": pa.repeat(pa.scalar(concept), n),
            "method": pa.repeat(pa.scalar("neat"), n),
            "ablation": pa.repeat(pa.scalar("zero"), n),
            "run_id": pa.repeat(pa.scalar(run_id), n),
            "layer": pa.array(np.repeat(np.arange(layers, dtype=np.int32), d_mlp)),
            "neuron": pa.array(np.tile(np.arange(d_mlp, dtype=np.int32), layers)),
            "score": pa.array(np.abs(effect)),
            "effect": pa.array(effect),
            "activation": pa.array(rng.normal(size=n).astype(np.float32)),
        },
    )


def build(atlas: str, layers: int, d_mlp: int, concepts: int) -> float:
    """Commit the missing concepts' runs; returns the seconds spent."""
    started = time.perf_counter()
    have = set(list_runs(atlas).column("run_id").to_pylist())
    for i in range(concepts):
        concept = f"concept-{i:02d}"
        run_id = f"bench-{concept}"
        if run_id in have:
            continue
        t = time.perf_counter()
        commit_run(atlas, concept_rows(concept, run_id, layers, d_mlp, seed=i), run_id=run_id, metadata={})
        print(f"  committed {concept}: {layers * d_mlp:,} rows in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)
    return time.perf_counter() - started


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atlas", help="atlas directory (kept; reused if it already holds the runs)")
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--d-mlp", type=int, default=28672)
    parser.add_argument("--concepts", type=int, default=44)
    parser.add_argument("--small", action="store_true", help="d_mlp 2,867: 10.1M rows")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    d_mlp = 2867 if args.small else args.d_mlp
    atlas = args.atlas or tempfile.mkdtemp(prefix="bench-atlas-")
    rows = args.layers * d_mlp * args.concepts
    print(f"atlas {atlas}: {args.layers} layers x {d_mlp:,} neurons x {args.concepts} concepts = {rows:,} rows",
          file=sys.stderr)
    build_seconds = build(atlas, args.layers, d_mlp, args.concepts)
    size = sum(p.stat().st_size for p in Path(atlas).rglob("*") if p.is_file())

    top_s, top = timed(lambda: top_neurons(atlas, concept="concept-07", top=20), args.repeat)
    best = top.to_pylist()[0]
    passport_s, passport = timed(
        lambda: Atlas.open(atlas).passport(best["layer"], best["neuron"], k=100), args.repeat)
    aggregate_sql = ("SELECT concept, count(*) AS neurons, avg(score) AS mean_score, max(score) AS max_score "
                     "FROM neurons GROUP BY concept")
    aggregate_s, aggregate = timed(lambda: sql_query(atlas, aggregate_sql), args.repeat)
    assert top.num_rows == 20 and aggregate.num_rows == args.concepts
    assert sum(aggregate.column("neurons").to_pylist()) == rows
    result = {
        "rows": rows, "neurons": args.layers * d_mlp, "concepts": args.concepts, "atlas_bytes": size,
        "build_seconds": round(build_seconds, 1), "top20_seconds": round(top_s, 3),
        "passport_seconds": round(passport_s, 3), "passport_rows": passport.num_rows,
        "aggregate_seconds": round(aggregate_s, 3), "repeat": args.repeat,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{rows:,} rows ({args.layers * d_mlp:,} neurons x {args.concepts} concepts), {size / 1e9:.2f} GB on disk"
          + (f", built in {build_seconds:.0f} s" if build_seconds > 1 else ""))
    print(f"top-20 of one concept        {top_s * 1000:8.0f} ms")
    print(f"passport of one neuron       {passport_s * 1000:8.0f} ms  ({passport.num_rows} concepts in its top 100)")
    print(f"aggregate over every row     {aggregate_s * 1000:8.0f} ms  (count, mean, max per concept)")
    print(f"(median of {args.repeat}; each call reads the Delta log afresh)")


if __name__ == "__main__":
    main()
