"""Benchmark: bf16 difference propagation against the exact float32 engine on every SmolLM2 neuron.

Both engines score all 46,080 neurons of SmolLM2-135M for one concept in the same run; prints their
neurons/s, the speed ratio, Spearman rank correlation of the scores, and top-k overlaps.
With --float64, both are also compared with the same exact engine run on a float64 copy of the model
(the truth float32 itself only approximates: concepts whose effects sit at float32's noise floor rank
differently in float32 and float64).
Usage: python benchmarks/bench_bf16.py [--threads 2] [--concept royalty] [--layers all|0,15,29] [--float64] [--json]
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from attribution.concepts import load_concept_file, resolve_targets  # noqa: E402
from attribution.models import load_model, resolve_model_source  # noqa: E402
from attribution.stats import spearman, top_overlap  # noqa: E402
from attribution.neat import clean_pass, concept_vector, neat_effects, neat_effects_bf16  # noqa: E402

BUILTIN = Path(__file__).resolve().parent.parent / "configs" / "concepts" / "builtin.yaml"


def score_all(engine, model, clean, targets, layers) -> tuple[torch.Tensor, float]:
    zeros = torch.zeros(model.d_mlp)
    started = time.perf_counter()
    effects = torch.cat([engine(model, clean, targets, layer, range(model.d_mlp), zeros) for layer in layers])
    return effects, time.perf_counter() - started


def float64_effects(model, concept, targets, layers) -> torch.Tensor:
    """The exact engine on a float64 copy of the model (weights upcast, every step in float64)."""
    import dataclasses

    high = load_model(model.source, device=str(model.device))
    high.hf.double()
    high = dataclasses.replace(high, dtype=torch.float64)
    clean = clean_pass(high, concept_vector(model, concept.examples).double(), targets)
    zeros = torch.zeros(high.d_mlp, dtype=torch.float64)
    return torch.cat([neat_effects(high, clean, targets, layer, range(high.d_mlp), zeros).double()
                      for layer in layers])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concept", default="royalty")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--float64", action="store_true", help="also compare both with a float64 reference")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model_source("smollm2-135m"), device=args.device)
    layers = range(model.n_layers) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    concept = next(c for c in load_concept_file(BUILTIN) if c.name == args.concept)
    targets = resolve_targets(model.tokenizer, concept).ids
    clean = clean_pass(model, concept_vector(model, concept.examples), targets)
    neat_effects_bf16(model, clean, targets, model.n_layers - 1, range(64), torch.zeros(model.d_mlp))  # warm-up

    exact, exact_s = score_all(neat_effects, model, clean, targets, layers)
    fast, fast_s = score_all(neat_effects_bf16, model, clean, targets, layers)
    n = exact.numel()
    result = {
        "model": "smollm2-135m", "concept": args.concept, "device": str(model.device), "threads": args.threads,
        "neurons": n, "float32_seconds": round(exact_s, 1), "bf16_seconds": round(fast_s, 1),
        "float32_neurons_per_s": round(n / exact_s), "bf16_neurons_per_s": round(n / fast_s),
        "speedup": round(exact_s / fast_s, 2), "spearman": round(spearman(exact.abs(), fast.abs()), 6),
        "max_abs_diff": float((exact - fast).abs().max()),
    }
    for k in (20, 100, 1000):
        result[f"top{k}_overlap"] = top_overlap(exact.abs(), fast.abs(), k)
    if args.float64:
        truth = float64_effects(model, concept, targets, layers)
        for name, effects in (("float32", exact), ("bf16", fast)):
            result[f"{name}_vs_float64_spearman"] = round(spearman(truth.abs(), effects.double().abs()), 6)
            result[f"{name}_vs_float64_top100_overlap"] = top_overlap(truth.abs(), effects.double().abs(), 100)
    if args.json:
        print(json.dumps(result))
        return
    print(f"SmolLM2-135M, {args.concept}, {n:,} neurons, {result['device']}, {args.threads} threads")
    print(f"float32 engine  {exact_s:7.1f} s  {result['float32_neurons_per_s']:>6,} neurons/s")
    print(f"bf16 diff-prop  {fast_s:7.1f} s  {result['bf16_neurons_per_s']:>6,} neurons/s   {result['speedup']}x")
    print(f"Spearman {result['spearman']}, top-20/100/1000 overlap {result['top20_overlap']:.2f}/"
          f"{result['top100_overlap']:.2f}/{result['top1000_overlap']:.3f}, max |diff| {result['max_abs_diff']:.2e}")
    if args.float64:
        for name in ("float32", "bf16"):
            print(f"{name} vs float64: Spearman {result[f'{name}_vs_float64_spearman']}, "
                  f"top-100 overlap {result[f'{name}_vs_float64_top100_overlap']:.2f}")


if __name__ == "__main__":
    main()
