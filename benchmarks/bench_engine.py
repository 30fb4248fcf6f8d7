"""Benchmark: the fast exact NEAT engine against the naive one-forward-per-neuron loop, same run.

Prints neurons/s of both on the packaged SmolLM2-135M (one concept, float32) for an early, a middle
and the last layer, the speed ratio, the largest difference between them, and the cached model load
time. Usage: python benchmarks/bench_engine.py [--threads 2] [--naive-neurons 24] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from attribution.concepts import load_concept_file, resolve_targets  # noqa: E402
from attribution.models import load_model, resolve_model_source  # noqa: E402
from attribution.neat import clean_pass, concept_vector, neat_effects, neat_effects_naive  # noqa: E402

BUILTIN = Path(__file__).resolve().parent.parent / "configs" / "concepts" / "builtin.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive-neurons", type=int, default=24, help="neurons per layer for the naive loop")
    parser.add_argument("--layers", default="0,15,29")
    parser.add_argument("--batch-rows", type=int, default=512)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = resolve_model_source("smollm2-135m")  # converts the GGUF once if the cache is empty
    started = time.perf_counter()
    import transformers.models.llama.modeling_llama  # noqa: F401  (lazy imports, not loading)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model = load_model(source, device="cpu")
    load_seconds = time.perf_counter() - started

    concept = next(c for c in load_concept_file(BUILTIN) if c.name == "royalty")
    targets = resolve_targets(model.tokenizer, concept).ids
    clean = clean_pass(model, concept_vector(model, concept.examples), targets)
    zeros = torch.zeros(model.d_mlp)
    neat_effects(model, clean, targets, 29, range(64), zeros)  # warm-up

    rows = []
    for layer in (int(x) for x in args.layers.split(",")):
        sample = range(args.naive_neurons)
        t = time.perf_counter()
        naive = neat_effects_naive(model, clean, targets, layer, sample, zeros)
        naive_rate = len(sample) / (time.perf_counter() - t)
        t = time.perf_counter()
        fast = neat_effects(model, clean, targets, layer, range(model.d_mlp), zeros, batch_rows=args.batch_rows)
        fast_rate = model.d_mlp / (time.perf_counter() - t)
        rows.append({"layer": layer, "naive_neurons_per_s": round(naive_rate, 1),
                     "fast_neurons_per_s": round(fast_rate, 1), "ratio": round(fast_rate / naive_rate, 1),
                     "max_abs_diff": float((fast[:len(sample)] - naive).abs().max())})
    # Whole-model rate: a layer's cost is (layers after it) + head, so weight layers by how many there are.
    naive_total = sum(model.d_mlp / r["naive_neurons_per_s"] for r in rows)
    fast_total = sum(model.d_mlp / r["fast_neurons_per_s"] for r in rows)
    result = {"model": source.name, "threads": args.threads, "dtype": "float32", "cached_load_seconds": round(load_seconds, 3),
              "import_seconds": round(import_seconds, 3),
              "layers": rows, "ratio_over_sampled_layers": round(naive_total / fast_total, 1),
              "torch": torch.__version__}
    if args.json:
        print(json.dumps(result))
        return
    print(f"SmolLM2-135M, float32, {args.threads} threads; cached model load {load_seconds:.2f} s "
          f"(after {import_seconds:.2f} s of Python imports)")
    print(f"{'layer':>5} {'naive n/s':>10} {'fast n/s':>10} {'ratio':>7} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['layer']:>5} {r['naive_neurons_per_s']:>10.1f} {r['fast_neurons_per_s']:>10.1f} "
              f"{r['ratio']:>6.1f}x {r['max_abs_diff']:>11.2e}")
    print(f"ratio over the sampled layers (equal neurons each): {result['ratio_over_sampled_layers']}x")


if __name__ == "__main__":
    main()
