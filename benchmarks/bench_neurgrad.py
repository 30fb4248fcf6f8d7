"""Benchmark: NeurGrad, NEG and integrated gradients on every SmolLM2 neuron, and how their rankings agree.

For each concept: cloze prompts from its examples (attribution/prompts.py); NeurGrad for all 46,080 neurons;
NEG (the sweep NeurGrad estimates) for a random sample of neurons and for NeurGrad's top neurons; IG for all
neurons. Prints times and Spearman correlations (signed effects and |effects|): NeurGrad vs NEG on the random
sample and on the top neurons, IG vs NeurGrad on all.
Usage: python benchmarks/bench_neurgrad.py [--threads 2] [--concepts royalty,negation] [--sample 200] [--json]
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
from attribution.integrated_gradients import ig_scores  # noqa: E402
from attribution.models import load_model, resolve_model_source  # noqa: E402
from attribution.neurgrad import activation_signs, neg_slopes, neurgrad_scores, sweep_shifts  # noqa: E402
from attribution.prompts import concept_prompts, gold_probs  # noqa: E402
from attribution.stats import spearman, top_overlap  # noqa: E402

BUILTIN = Path(__file__).resolve().parent.parent / "configs" / "concepts" / "builtin.yaml"


@torch.no_grad()
def naive_neg_seconds_per_row(model, prompts, neurons, shifts) -> float:
    """The reference way, timed on a few rows: one full forward of the whole prompt per (neuron, shift, prompt)."""
    rows = 0
    start = time.perf_counter()
    for layer, neuron in neurons:
        for prompt in prompts:
            ids = torch.tensor([model.tokenizer(prompt.text)["input_ids"]], device=model.device)
            for s in shifts.tolist():
                def hook(module, args):
                    acts = args[0].clone()
                    acts[0, -1, neuron] += s * activation_signs(acts[0, -1, neuron])
                    return (acts,)
                handle = model.site(layer).register_forward_pre_hook(hook)
                try:
                    gold_probs(model.hf(input_ids=ids).logits[:, -1], prompt.target_ids)
                finally:
                    handle.remove()
                rows += 1
    return (time.perf_counter() - start) / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concepts", default="royalty,negation")
    parser.add_argument("--sample", type=int, default=200, help="neurons swept by NEG")
    parser.add_argument("--top", type=int, default=50, help="NeurGrad's top neurons, also swept by NEG")
    parser.add_argument("--points", type=int, default=8, help="NEG sweep points (the paper: 40)")
    parser.add_argument("--max-shift", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=20, help="IG Riemann steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model_source("smollm2-135m"), device="cpu")
    n_neurons = model.n_layers * model.d_mlp
    sample = torch.randperm(n_neurons, generator=torch.Generator().manual_seed(args.seed))[:args.sample]
    neurons = [(int(i) // model.d_mlp, int(i) % model.d_mlp) for i in sample]
    wanted = args.concepts.split(",")
    results = []
    for concept in [c for c in load_concept_file(BUILTIN) if c.name in wanted]:
        prompts = concept_prompts(model.tokenizer, concept, resolve_targets(model.tokenizer, concept).ids)
        t = time.perf_counter()
        ng = neurgrad_scores(model, prompts)
        ng_s = time.perf_counter() - t
        top = ng.score.flatten().topk(args.top).indices  # [top]
        t = time.perf_counter()
        neg = neg_slopes(model, prompts, neurons, points=args.points, max_shift=args.max_shift)
        neg_s = time.perf_counter() - t
        neg_top = neg_slopes(model, prompts, [(int(i) // model.d_mlp, int(i) % model.d_mlp) for i in top],
                             points=args.points, max_shift=args.max_shift)
        naive_row_s = naive_neg_seconds_per_row(model, prompts[:2], neurons[:2],
                                                sweep_shifts(args.points, args.max_shift)[:2])
        t = time.perf_counter()
        ig = ig_scores(model, prompts, steps=args.steps)
        ig_s = time.perf_counter() - t
        ng_sample = ng.effect.flatten()[sample]
        ng_top = ng.effect.flatten()[top]
        rows = len(prompts) * len(neurons) * args.points
        results.append({
            "concept": concept.name, "prompts": len(prompts),
            "neurgrad_seconds": round(ng_s, 2), "neg_seconds": round(neg_s, 1), "neg_rows": rows,
            "neg_rows_per_second": round(rows / neg_s), "naive_rows_per_second": round(1 / naive_row_s),
            "ig_seconds": round(ig_s, 1),
            "spearman_neurgrad_neg": round(spearman(ng_sample, neg), 4),
            "spearman_neurgrad_neg_abs": round(spearman(ng_sample.abs(), neg.abs()), 4),
            "sign_agreement_neurgrad_neg": round(float((ng_sample.sign() == neg.sign()).float().mean()), 3),
            "spearman_neurgrad_neg_top": round(spearman(ng_top, neg_top), 4),
            "spearman_neurgrad_neg_top_abs": round(spearman(ng_top.abs(), neg_top.abs()), 4),
            "sign_agreement_neurgrad_neg_top": round(float((ng_top.sign() == neg_top.sign()).float().mean()), 3),
            "spearman_ig_neurgrad": round(spearman(ig.effect.flatten(), ng.effect.flatten()), 4),
            "spearman_ig_neurgrad_abs": round(spearman(ig.score.flatten(), ng.score.flatten()), 4),
            "top100_overlap_ig_neurgrad": top_overlap(ig.score.flatten(), ng.score.flatten(), 100),
        })
    if args.json:
        print(json.dumps(results))
        return
    print(f"SmolLM2-135M, {n_neurons:,} neurons, float32, {args.threads} threads; NEG: {len(neurons)} random "
          f"neurons (and NeurGrad's top {args.top}) x {args.points} shifts in [-{args.max_shift}, {args.max_shift}]; "
          f"IG: {args.steps} steps. Spearman a~b: signed effects, |a|~|b|: scores; sign: share of equal signs")
    print(f"{'concept':<10} {'prompts':>7} {'NG s':>5} {'NEG s':>6} {'NEG rows/s':>10} {'naive rows/s':>12} "
          f"{'IG s':>6} {'NG~NEG':>7} {'|NG|~|NEG|':>10} {'sign':>5} {'top: NG~NEG':>11} {'|NG|~|NEG|':>10} "
          f"{'sign':>5} {'IG~NG':>6} {'|IG|~|NG|':>9} {'IG/NG top100':>12}")
    for r in results:
        print(f"{r['concept']:<10} {r['prompts']:>7} {r['neurgrad_seconds']:>5.1f} {r['neg_seconds']:>6.1f} "
              f"{r['neg_rows_per_second']:>10} {r['naive_rows_per_second']:>12} {r['ig_seconds']:>6.1f} "
              f"{r['spearman_neurgrad_neg']:>7.3f} {r['spearman_neurgrad_neg_abs']:>10.3f} "
              f"{r['sign_agreement_neurgrad_neg']:>5.2f} {r['spearman_neurgrad_neg_top']:>11.3f} "
              f"{r['spearman_neurgrad_neg_top_abs']:>10.3f} {r['sign_agreement_neurgrad_neg_top']:>5.2f} "
              f"{r['spearman_ig_neurgrad']:>6.3f} {r['spearman_ig_neurgrad_abs']:>9.3f} "
              f"{r['top100_overlap_ig_neurgrad']:>12.2f}")


if __name__ == "__main__":
    main()
