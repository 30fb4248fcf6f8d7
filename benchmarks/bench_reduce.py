"""Benchmark: the driver's reduce + commit of a large staged run: peak memory and time, streaming
(`commit_staged_run`) against the previous in-memory reduce (read every staged shard, concatenate,
sort on the string keys, `write_deltalake`) measured in the same invocation.

Each measurement runs in a fresh process (its peak RSS is that process's, as a driver's would be).
The previous reduce holds the whole run several times over, so by default it runs on a quarter of
the rows (`--old-fraction`); the streaming reduce runs on that size too, for a like-for-like ratio.

Usage: python benchmarks/bench_reduce.py [--layers 32] [--d-mlp 14336] [--concepts 44] [--old-fraction 0.25] [--json]
       # defaults: 32 x 14,336 neurons (Llama-8B's MLPs) x 44 concepts = 20,185,088 rows
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from storage.schema import shard_table  # noqa: E402

MODEL = "synthetic-8b"
RUN = "bench-reduce"


def shard_rows(layer: int, d_mlp: int, concepts: int, seed: int) -> pa.Table:
    """One staged shard: one layer's neurons for every concept (as an actor writes it)."""
    rng = np.random.default_rng(seed)
    n = d_mlp * concepts
    effect = (rng.standard_t(3, size=n) * 0.05).astype(np.float32)
    names = np.array([f"concept-{i:02d}" for i in range(concepts)])
    return shard_table({
        "model": pa.repeat(pa.scalar(MODEL), n),
        "model_revision": pa.repeat(pa.scalar("sha256:0000synthetic"), n),
        "concept": pa.array(np.repeat(names, d_mlp)),
        "method": pa.repeat(pa.scalar("neat"), n),
        "ablation": pa.repeat(pa.scalar("zero"), n),
        "run_id": pa.repeat(pa.scalar(RUN), n),
        "layer": pa.array(np.full(n, layer, np.int32)),
        "neuron": pa.array(np.tile(np.arange(d_mlp, dtype=np.int32), concepts)),
        "score": pa.array(np.abs(effect)),
        "effect": pa.array(effect),
        "activation": pa.array(rng.normal(size=n).astype(np.float32)),
    })


def stage(atlas: str, layers: int, d_mlp: int, concepts: int) -> list[str]:
    from storage.staging import write_shard

    ids = []
    for layer in range(layers):
        shard_id = f"neat-L{layer:03d}"
        write_shard(shard_rows(layer, d_mlp, concepts, seed=layer), atlas, run_id=RUN, shard_id=shard_id)
        ids.append(shard_id)
    return ids


def measure(kind: str, atlas: str, shard_ids: list[str], rows: int) -> dict:
    """In this (fresh) process: reduce and commit the staged run; seconds and peak RSS."""
    started = time.perf_counter()
    if kind == "streaming":
        from storage.commit import commit_staged_run

        commit_staged_run(atlas, run_id=RUN, shard_ids=shard_ids, metadata={}, expected_rows=rows)
    else:  # the reduce as it was: everything in memory, sorted on five string keys, write_deltalake
        from deltalake import write_deltalake

        from storage.commit import PARTITION_BY, WRITER, rank_rows
        from storage.schema import ATLAS_SCHEMA
        from storage.staging import read_staged

        table = read_staged(atlas, run_id=RUN, shard_ids=shard_ids)
        assert table.num_rows == rows
        data = rank_rows(table)
        del table
        created = pa.scalar(datetime.now(timezone.utc), ATLAS_SCHEMA.field("created_at").type)
        data = data.append_column(ATLAS_SCHEMA.field("created_at"), pa.repeat(created, data.num_rows))
        write_deltalake(f"{atlas}/neurons", data, mode="append", partition_by=PARTITION_BY, writer_properties=WRITER)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"kind": kind, "rows": rows, "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)}


def run_measure(kind: str, layers: int, d_mlp: int, concepts: int, scratch: str) -> dict:
    atlas = tempfile.mkdtemp(prefix=f"bench-reduce-{kind}-", dir=scratch)
    try:
        t = time.perf_counter()
        ids = stage(atlas, layers, d_mlp, concepts)
        print(f"  staged {layers * d_mlp * concepts:,} rows in {len(ids)} shards ({time.perf_counter() - t:.0f} s); "
              f"{kind} reduce ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--measure", kind, "--atlas", atlas, "--layers", str(layers),
                              "--d-mlp", str(d_mlp), "--concepts", str(concepts)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {result}", file=sys.stderr, flush=True)
        return result
    finally:
        shutil.rmtree(atlas, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--d-mlp", type=int, default=14336)
    parser.add_argument("--concepts", type=int, default=44)
    parser.add_argument("--old-fraction", type=float, default=0.25,
                        help="the previous reduce runs on this share of the layers (it holds the whole run)")
    parser.add_argument("--scratch", help="directory for the atlases (default: TMPDIR)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", choices=("streaming", "in-memory"), help=argparse.SUPPRESS)
    parser.add_argument("--atlas", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        ids = [f"neat-L{layer:03d}" for layer in range(args.layers)]
        print(json.dumps(measure(args.measure, args.atlas, ids, args.layers * args.d_mlp * args.concepts)))
        return
    small = max(1, round(args.layers * args.old_fraction))
    results = {
        "streaming_full": run_measure("streaming", args.layers, args.d_mlp, args.concepts, args.scratch),
        "streaming_small": run_measure("streaming", small, args.d_mlp, args.concepts, args.scratch),
        "in_memory_small": run_measure("in-memory", small, args.d_mlp, args.concepts, args.scratch),
    }
    if args.json:
        print(json.dumps(results))
        return
    full, new, old = results["streaming_full"], results["streaming_small"], results["in_memory_small"]
    print(f"streaming reduce, {full['rows']:,} rows: {full['seconds']:.0f} s, driver peak RSS {full['peak_rss_mb']:,} MB")
    print(f"at {old['rows']:,} rows: streaming {new['seconds']:.0f} s / {new['peak_rss_mb']:,} MB, "
          f"previous in-memory reduce {old['seconds']:.0f} s / {old['peak_rss_mb']:,} MB "
          f"(time ratio {new['seconds'] / old['seconds']:.2f}x, memory ratio {new['peak_rss_mb'] / old['peak_rss_mb']:.2f}x)")


if __name__ == "__main__":
    main()
