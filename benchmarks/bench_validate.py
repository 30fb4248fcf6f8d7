"""Benchmark: `validate`'s batched ablations against the naive loop, on SmolLM2 with the defaults.

One concept (default royalty) against the other built-in concepts: k 1,5,10,50, 20 random draws,
its cloze prompts and the neutral text, with the naive loop (one forward per set and concept,
`validate_ranking_naive`) and the batched one (`validate_ranking`) in the same run; prints both
times, their ratio and the largest difference of any number between them.
Usage: python benchmarks/bench_validate.py [--threads 2] [--concept royalty] [--draws 20] [--skip-naive] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from attribution.ablation import read_reference_texts  # noqa: E402
from attribution.atp import atp_effects, log_p_gradients  # noqa: E402
from attribution.concepts import load_concept_file, resolve_targets  # noqa: E402
from attribution.models import load_model, resolve_model_source  # noqa: E402
from attribution.neat import clean_pass, concept_vector  # noqa: E402
from attribution.prompts import concept_prompts  # noqa: E402
from attribution.validation import ConceptProbe, validate_ranking, validate_ranking_naive  # noqa: E402

BUILTIN = Path(__file__).resolve().parent.parent / "configs" / "concepts" / "builtin.yaml"


def _largest_difference(fast, slow) -> float:
    worst = 0.0
    for a, b in zip(fast, slow):
        for name, value in asdict(b).items():
            if isinstance(value, float) and abs(value) != float("inf"):
                worst = max(worst, abs(getattr(a, name) - value))
        for name, value in b.other_changes.items():
            worst = max(worst, abs(a.other_changes[name] - value))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concept", default="royalty")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--skip-naive", action="store_true", help="time only the batched implementation")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model_source("smollm2-135m"), device="cpu")
    probes = {}
    for concept in load_concept_file(BUILTIN):
        targets = resolve_targets(model.tokenizer, concept).ids
        prompts = tuple(concept_prompts(model.tokenizer, concept, targets))
        probes[concept.name] = ConceptProbe(concept.name, clean_pass(model, concept_vector(model, concept.examples),
                                                                     targets), targets, prompts)
    probe = probes[args.concept]
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    # The ranking to validate: AtP's top-50 (which neurons are ablated does not change the cost).
    grads = log_p_gradients(model, probe.clean, probe.target_ids)
    estimate = torch.cat([atp_effects(grads, probe.clean, layer, range(model.d_mlp), zeros[layer])
                          for layer in range(model.n_layers)]).abs()
    top = [(i // model.d_mlp, i % model.d_mlp) for i in estimate.argsort(descending=True)[:50].tolist()]
    kwargs = dict(others=[p for n, p in probes.items() if n != args.concept], ablate_to=zeros,
                  layers=list(range(model.n_layers)), draws=args.draws, neutral_texts=read_reference_texts())
    ks = [1, 5, 10, 50]
    # Wall seconds and this process's CPU seconds (on a shared machine the wall time mostly measures
    # the other processes; CPU seconds count this work's threads only).
    t, c = time.perf_counter(), time.process_time()
    fast = validate_ranking(model, probe, top, ks, **kwargs)
    batched_s, batched_cpu = time.perf_counter() - t, time.process_time() - c
    result = {"concept": args.concept, "draws": args.draws, "prompts": len(probe.prompts),
              "batched_seconds": round(batched_s, 1), "batched_cpu_seconds": round(batched_cpu, 1)}
    if not args.skip_naive:
        t, c = time.perf_counter(), time.process_time()
        slow = validate_ranking_naive(model, probe, top, ks, **kwargs)
        naive_s, naive_cpu = time.perf_counter() - t, time.process_time() - c
        result.update(naive_seconds=round(naive_s, 1), naive_cpu_seconds=round(naive_cpu, 1),
                      speedup=round(naive_s / batched_s, 2), cpu_speedup=round(naive_cpu / batched_cpu, 2),
                      largest_difference=_largest_difference(fast, slow))
    if args.json:
        print(json.dumps(result))
    else:
        print("  ".join(f"{key}={value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
