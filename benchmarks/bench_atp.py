"""Benchmark: how well attribution patching (AtP) screens for exact NEAT on every SmolLM2 neuron.

For each built-in concept: AtP for all 46,080 neurons (one forward + backward) and exact float32 NEAT
for all of them, in the same run; prints both times, the Spearman rank correlation of |effect|, and
top-k recall (the share of NEAT's top-k that AtP's top-k, or its top-10k, contains).
Usage: python benchmarks/bench_atp.py [--threads 2] [--concepts royalty,negation] [--json]
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

from attribution.atp import atp_effects, log_p_gradients  # noqa: E402
from attribution.concepts import load_concept_file, resolve_targets  # noqa: E402
from attribution.models import load_model, resolve_model_source  # noqa: E402
from attribution.stats import spearman, top_overlap  # noqa: E402
from attribution.neat import clean_pass, concept_vector, neat_effects  # noqa: E402

BUILTIN = Path(__file__).resolve().parent.parent / "configs" / "concepts" / "builtin.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concepts", default="royalty,negation")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model_source("smollm2-135m"), device="cpu")
    wanted = args.concepts.split(",")
    zeros = torch.zeros(model.d_mlp)
    results = []
    for concept in [c for c in load_concept_file(BUILTIN) if c.name in wanted]:
        targets = resolve_targets(model.tokenizer, concept).ids
        clean = clean_pass(model, concept_vector(model, concept.examples), targets)
        t = time.perf_counter()
        grads = log_p_gradients(model, clean, targets)
        estimate = torch.cat([atp_effects(grads, clean, layer, range(model.d_mlp), zeros)
                              for layer in range(model.n_layers)]).abs()
        atp_s = time.perf_counter() - t
        t = time.perf_counter()
        exact = torch.cat([neat_effects(model, clean, targets, layer, range(model.d_mlp), zeros)
                           for layer in range(model.n_layers)]).abs()
        neat_s = time.perf_counter() - t
        results.append({
            "concept": concept.name, "atp_seconds": round(atp_s, 2), "neat_seconds": round(neat_s, 1),
            "spearman": round(spearman(exact, estimate), 4),
            "top20_recall": top_overlap(exact, estimate, 20), "top100_recall": top_overlap(exact, estimate, 100),
            "top100_recall_in_atp_top1000": top_overlap(exact, estimate, 100, within=1000),
        })
    if args.json:
        print(json.dumps(results))
        return
    print(f"SmolLM2-135M, {model.n_layers * model.d_mlp:,} neurons, float32, {args.threads} threads")
    print(f"{'concept':<20} {'AtP s':>6} {'NEAT s':>7} {'Spearman':>9} {'top20':>6} {'top100':>7} {'top100 in AtP top1000':>22}")
    for r in results:
        print(f"{r['concept']:<20} {r['atp_seconds']:>6.2f} {r['neat_seconds']:>7.1f} {r['spearman']:>9.4f} "
              f"{r['top20_recall']:>6.2f} {r['top100_recall']:>7.2f} {r['top100_recall_in_atp_top1000']:>22.2f}")


if __name__ == "__main__":
    main()
