"""Benchmark: reads of an atlas with 1,000 committed runs on a local S3 server (moto), before and after
`neuron-atlas atlas optimize`, against the previous read path measured in the same run.

The runs are small synthetic nightly runs committed through the same commit code (`commit_run`) into
a local directory, then uploaded to the S3 server as they are (the log holds relative paths): one
concept per run, every 10th run a one-layer rerun. Timed, each from a fresh read of the Delta log
as a CLI call does: `query --top 20` (top_neurons) and a neuron passport (Atlas.passport, k=100).
The previous read path (as before this change): the runs on offer come from the rank-1 rows of every
file in the concept's partition (one GET per run ever committed), the passport from `rank <= k` of
every file of the model.

Usage: python benchmarks/bench_atlas_runs.py [--runs 1000] [--concepts 10] [--layers 4] [--d-mlp 512]
       [--build-dir DIR] [--repeat 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.dataset as pds  # noqa: E402

from storage.atlas import Atlas  # noqa: E402
from storage.commit import commit_run  # noqa: E402
from storage.history import optimize_atlas  # noqa: E402
from storage.read import list_runs, open_neurons, top_neurons  # noqa: E402
from storage.schema import shard_table  # noqa: E402

MODEL = "nightly-model"


def run_rows(run_id: str, concept: str, layers: list[int], d_mlp: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(layers) * d_mlp
    effect = (rng.standard_t(3, size=n) * 0.05).astype(np.float32)
    return shard_table({
        "model": pa.repeat(pa.scalar(MODEL), n), "model_revision": pa.repeat(pa.scalar("sha256:nightly"), n),
        "concept": pa.repeat(pa.scalar(concept), n), "method": pa.repeat(pa.scalar("neat"), n),
        "ablation": pa.repeat(pa.scalar("zero"), n), "run_id": pa.repeat(pa.scalar(run_id), n),
        "layer": pa.array(np.repeat(np.array(layers, np.int32), d_mlp)),
        "neuron": pa.array(np.tile(np.arange(d_mlp, dtype=np.int32), len(layers))),
        "score": pa.array(np.abs(effect)), "effect": pa.array(effect),
        "activation": pa.array(rng.normal(size=n).astype(np.float32)),
    })


def build(directory: str, runs: int, concepts: int, layers: int, d_mlp: int) -> float:
    started = time.perf_counter()
    have = set(list_runs(directory).column("run_id").to_pylist())
    for i in range(runs):
        run_id = f"night-{i:05d}"
        if run_id in have:
            continue
        shown = [i % layers] if i % 10 == 9 else list(range(layers))  # every 10th: a one-layer rerun
        commit_run(directory, run_rows(run_id, f"concept-{i % concepts:02d}", shown, d_mlp, seed=i),
                   run_id=run_id, metadata={"i": i})
        if i % 100 == 99:
            print(f"  committed {i + 1} runs ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return time.perf_counter() - started


def previous_top(uri: str, options: dict, concept: str, top: int) -> pa.Table:
    """The read path before this change: rank-1 rows of every file in the partition pick the run."""
    data = open_neurons(uri, options).to_pyarrow_dataset()
    where = (pds.field("model") == MODEL) & (pds.field("concept") == concept) & (pds.field("method") == "neat")
    heads = data.to_table(columns=["run_id", "created_at"], filter=where & (pds.field("rank") == 1))
    run = heads.sort_by([("created_at", "descending"), ("run_id", "descending")]).column("run_id")[0].as_py()
    return data.to_table(filter=where & (pds.field("run_id") == run) & (pds.field("rank") <= top))


def previous_passport(uri: str, options: dict, layer: int, neuron: int, k: int) -> pa.Table:
    top = open_neurons(uri, options).to_pyarrow_dataset().to_table(
        filter=(pds.field("model") == MODEL) & (pds.field("rank") <= k))
    return top.filter(pc.and_(pc.equal(top.column("layer"), layer), pc.equal(top.column("neuron"), neuron)))


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def measure(uri: str, options: dict, repeat: int) -> dict:
    atlas = Atlas(uri, options)
    top_s, top = timed(lambda: top_neurons(uri, concept="concept-03", top=20, storage_options=options), repeat)
    best = top.to_pylist()[0]
    passport_s, passport = timed(lambda: atlas.passport(best["layer"], best["neuron"], k=100), repeat)
    old_top_s, _ = timed(lambda: previous_top(uri, options, "concept-03", 20), repeat)
    old_passport_s, _ = timed(lambda: previous_passport(uri, options, best["layer"], best["neuron"], 100), repeat)
    return {"top20_s": round(top_s, 3), "passport_s": round(passport_s, 3),
            "previous_top20_s": round(old_top_s, 3), "previous_passport_s": round(old_passport_s, 3),
            "top": top.select(["rank", "layer", "neuron", "run_id"]).to_pylist(),
            "passport": passport.to_pylist()}


def main() -> None:
    from s3_server import MotoProcess

    import fsspec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-mlp", type=int, default=512)
    parser.add_argument("--build-dir", help="local atlas to build into (kept and reused)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    local = args.build_dir or tempfile.mkdtemp(prefix="bench-runs-")
    build_s = build(local, args.runs, args.concepts, args.layers, args.d_mlp)
    server = MotoProcess()
    try:
        options = server.s3.storage_options
        bucket = server.s3.new_bucket()
        fs = fsspec.filesystem("s3", key=options["AWS_ACCESS_KEY_ID"], secret=options["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=options["AWS_ENDPOINT_URL"], skip_instance_cache=True)
        t = time.perf_counter()
        for name in ("neurons", "runs"):
            fs.put(f"{local}/{name}", f"{bucket}/atlas/", recursive=True)
        upload_s = time.perf_counter() - t
        uri = f"s3://{bucket}/atlas"
        runs = list_runs(uri, options).num_rows
        before = measure(uri, options, args.repeat)
        t = time.perf_counter()
        report = optimize_atlas(uri, storage_options=options)
        optimize_s = time.perf_counter() - t
        after = measure(uri, options, args.repeat)
        assert before["top"] == after["top"] and before["passport"] == after["passport"]
    finally:
        server.stop()
        if not args.build_dir:
            shutil.rmtree(local, ignore_errors=True)
    result = {"runs": runs, "build_s": round(build_s, 1), "upload_s": round(upload_s, 1),
              "optimize_s": round(optimize_s, 1), "optimize": report.as_dict(),
              "before": {k: v for k, v in before.items() if k.endswith("_s")},
              "after": {k: v for k, v in after.items() if k.endswith("_s")}}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{runs} runs on S3 (moto): built in {build_s:.0f} s, uploaded in {upload_s:.0f} s, optimize {optimize_s:.1f} s")
    for label, m in (("before optimize", before), ("after optimize", after)):
        print(f"{label:16} query --top 20 {m['top20_s'] * 1000:6.0f} ms (previous path {m['previous_top20_s'] * 1000:6.0f} ms, "
              f"{m['previous_top20_s'] / m['top20_s']:.1f}x)   passport {m['passport_s'] * 1000:6.0f} ms "
              f"(previous path {m['previous_passport_s'] * 1000:6.0f} ms, {m['previous_passport_s'] / m['passport_s']:.1f}x)")
    print(f"(median of {args.repeat}; each call reads the Delta log afresh; identical answers before and after)")


if __name__ == "__main__":
    main()
