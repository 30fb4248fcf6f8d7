"""Benchmark: bf16 difference propagation against the exact float32 engine on every SmolLM2 neuron.

Both engines score all 46,080 neurons of SmolLM2-135M for one concept in the same run; prints their
neurons/s, the speed ratio, Spearman rank correlation of the scores, and top-k overlaps. The bf16 engine
runs as an actor runs it: weights held once in bf16 (attribution/held_weights.py; bytes per parameter
printed), head moments from the float32 preparation. Each engine's floor is the time of its own matrix
multiplies alone (the engine's shapes: 512-row batches through every later block, the head's products),
measured as GEMMs in the same run before and after the engines (their spread says how noisy it was).
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
from attribution.held_weights import held_bytes, hold_in_bf16  # noqa: E402
from attribution.lm_head import head_moments  # noqa: E402
from attribution.neat import clean_pass, concept_vector, neat_effects, neat_effects_bf16  # noqa: E402

BUILTIN = Path(__file__).resolve().parent.parent / "configs" / "concepts" / "builtin.yaml"


def score_all(engine, model, clean, targets, layers, **options) -> tuple[torch.Tensor, float]:
    zeros = torch.zeros(model.d_mlp)
    started = time.perf_counter()
    effects = torch.cat([engine(model, clean, targets, layer, range(model.d_mlp), zeros, **options)
                         for layer in layers])
    return effects, time.perf_counter() - started


def gemm_seconds(shapes: list[tuple[int, int, int]], dtype: torch.dtype, *, repeats: int = 5) -> float:
    """Best-of-`repeats` time of one pass of x [rows, k] @ w[n, k].T for each (rows, k, n) in `shapes`."""
    operands = [(torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)) for rows, k, n in shapes]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for x, w in operands:
            torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return best


def floors(model, *, float32_block_rows: int, float32_head_rows: int, bf16_block_rows: int, bf16_head_rows: int,
           taylor_rows: int, rows: int = 512) -> dict[str, float]:
    """Seconds of each engine's matrix multiplies alone, at the engine's shapes (`rows`-row batches).
    *_block_rows: rows x later blocks; *_head_rows: rows through the whole-vocabulary head (bf16: only
    those the expansion did not serve); taylor_rows: rows through the expansion's [d, d] float32 product."""
    cfg = model.hf.config
    d, d_mlp, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads)
    block = [(rows, d, kv), (rows, kv, d), (rows, d, 2 * d_mlp), (rows, d_mlp, d)]  # v, folded o, gate|up, down
    f32, bf16 = torch.float32, torch.bfloat16
    return {
        "float32": (float32_block_rows * gemm_seconds(block, f32) + float32_head_rows * gemm_seconds([(rows, d, vocab)], f32)) / rows,
        "bf16": (bf16_block_rows * gemm_seconds(block, bf16) + bf16_head_rows * gemm_seconds([(rows, d, vocab)], bf16)
                 + taylor_rows * gemm_seconds([(rows, d, d)], f32)) / rows,
    }


def float64_effects(model, vector, targets, layers) -> torch.Tensor:
    """The exact engine on a float64 copy of the model (weights upcast, every step in float64)."""
    import dataclasses

    high = load_model(model.source, device=str(model.device))
    high.hf.double()
    high = dataclasses.replace(high, dtype=torch.float64)
    clean = clean_pass(high, vector.double(), targets)  # the float32 model's concept vector
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
    moments = head_moments(model, clean.resid[-1])  # the float32 preparation's, as an actor gets them
    neat_effects(model, clean, targets, model.n_layers - 1, range(64), torch.zeros(model.d_mlp))  # warm-up

    n_layers, d_mlp = model.n_layers, model.d_mlp
    later = sum(n_layers - 1 - layer for layer in layers)
    batches = -(-d_mlp // 511)  # the float32 engine's 512-row batches each carry a clean row
    counts = dict(float32_block_rows=(d_mlp + batches) * later, float32_head_rows=(d_mlp + batches) * len(layers),
                  bf16_block_rows=d_mlp * later, taylor_rows=d_mlp * len(layers))
    exact, exact_s = score_all(neat_effects, model, clean, targets, layers)
    hold_in_bf16(model)  # as a bf16 actor holds it: every multiplied weight once, in bf16
    held, params = held_bytes(model)
    neat_effects_bf16(model, clean, targets, n_layers - 1, range(64), torch.zeros(d_mlp), moments=moments)  # warm-up
    stats: dict = {}
    fast, fast_s = score_all(neat_effects_bf16, model, clean, targets, layers, moments=moments, stats=stats)
    counts["bf16_head_rows"] = stats["whole_vocabulary_rows"]
    floor_runs = [floors(model, **counts) for _ in range(2)]  # before any other use of the cores ends
    floor = {k: sum(f[k] for f in floor_runs) / 2 for k in ("float32", "bf16")}
    spread = max(abs(floor_runs[0][k] - floor_runs[1][k]) / floor[k] for k in floor)
    n = exact.numel()
    result = {
        "model": "smollm2-135m", "concept": args.concept, "device": str(model.device), "threads": args.threads,
        "neurons": n, "float32_seconds": round(exact_s, 1), "bf16_seconds": round(fast_s, 1),
        "float32_neurons_per_s": round(n / exact_s), "bf16_neurons_per_s": round(n / fast_s),
        "speedup": round(exact_s / fast_s, 2), "spearman": round(spearman(exact.abs(), fast.abs()), 6),
        "max_abs_diff": float((exact - fast).abs().max()),
        "float32_floor_seconds": round(floor["float32"], 1), "bf16_floor_seconds": round(floor["bf16"], 1),
        "float32_of_floor": round(floor["float32"] / exact_s, 3), "bf16_of_floor": round(floor["bf16"] / fast_s, 3),
        "floor_spread": round(spread, 3), "whole_vocabulary_rows": stats["whole_vocabulary_rows"],
        "bf16_bytes_per_parameter": round(held / params, 3),
    }
    for k in (20, 100, 1000):
        result[f"top{k}_overlap"] = top_overlap(exact.abs(), fast.abs(), k)
    if args.float64:
        truth = float64_effects(model, clean.vector, targets, layers)
        for name, effects in (("float32", exact), ("bf16", fast)):
            result[f"{name}_vs_float64_spearman"] = round(spearman(truth.abs(), effects.double().abs()), 6)
            result[f"{name}_vs_float64_top100_overlap"] = top_overlap(truth.abs(), effects.double().abs(), 100)
    if args.json:
        print(json.dumps(result))
        return
    print(f"SmolLM2-135M, {args.concept}, {n:,} neurons, {result['device']}, {args.threads} threads")
    print(f"float32 engine  {exact_s:7.1f} s  {result['float32_neurons_per_s']:>6,} neurons/s   "
          f"floor {floor['float32']:.1f} s ({100 * result['float32_of_floor']:.0f}% of it)")
    print(f"bf16 diff-prop  {fast_s:7.1f} s  {result['bf16_neurons_per_s']:>6,} neurons/s   {result['speedup']}x   "
          f"floor {floor['bf16']:.1f} s ({100 * result['bf16_of_floor']:.0f}% of it)")
    print(f"floors: GEMMs of the engines' shapes measured twice, {100 * spread:.0f}% apart; bf16 replica holds "
          f"{result['bf16_bytes_per_parameter']:.2f} bytes per parameter; {stats['whole_vocabulary_rows']:,} of "
          f"{n:,} rows took the whole-vocabulary head")
    print(f"Spearman {result['spearman']}, top-20/100/1000 overlap {result['top20_overlap']:.2f}/"
          f"{result['top100_overlap']:.2f}/{result['top1000_overlap']:.3f}, max |diff| {result['max_abs_diff']:.2e}")
    if args.float64:
        for name in ("float32", "bf16"):
            print(f"{name} vs float64: Spearman {result[f'{name}_vs_float64_spearman']}, "
                  f"top-100 overlap {result[f'{name}_vs_float64_top100_overlap']:.2f}")


if __name__ == "__main__":
    main()
