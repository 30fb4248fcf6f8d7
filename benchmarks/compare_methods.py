"""Every method side by side on the built-in concepts: one atlas run with all methods, then the
validation of each method's top-k (causal effect vs random, specificity, collateral damage) and its
agreement with exact NEAT.

    python benchmarks/compare_methods.py [--layers all] [--k 10] [--draws 20] [--atlas DIR] [--json FILE]

Prints a markdown table (one row per method, means over the concepts) for the README, and per-concept
numbers as JSON. Needs `pip install -e .` (or run from the repository root).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402

from attribution.ablation import ablation_values, read_reference_texts  # noqa: E402
from attribution.concepts import load_concept_file  # noqa: E402
from attribution.models import load_model  # noqa: E402
from attribution.neat import clean_pass, concept_vector  # noqa: E402
from attribution.prompts import concept_prompts  # noqa: E402
from attribution.stats import spearman  # noqa: E402
from attribution.validation import ConceptProbe, validate_ranking  # noqa: E402
from cluster.config import METHODS, apply_overrides, load_job_config  # noqa: E402
from cluster.driver import run_job  # noqa: E402
from cluster.plan import resolve_job  # noqa: E402
from storage.commit import run_committed  # noqa: E402
from storage.contrast import contrastive_table  # noqa: E402
from storage.read import open_neurons, run_metadata  # noqa: E402

NEAT = "neat"


def job_config(atlas: str, layers: str, methods: list[str], run_id: str):
    return apply_overrides(load_job_config(ROOT / "configs" / "demo.yaml"), atlas=atlas, layers=layers,
                           methods=methods, ablation=["zero"], run_id=run_id)


def run_all_methods(atlas: str, layers: str, methods: list[str], run_id: str) -> tuple:
    plan = resolve_job(job_config(atlas, layers, methods, run_id))
    started = time.perf_counter()
    summary = run_job(plan, progress_stream=sys.stderr)
    print(f"run {run_id}: {summary.rows:,} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return plan, run_metadata(atlas, run_id)


def ranking(rows, method: str, concept: str, *, contrastive: bool = False) -> list[tuple[int, int]]:
    of_method = rows.filter(pc.equal(rows["method"], method))
    if contrastive:
        table = contrastive_table(of_method, concept)
        return list(zip(table["layer"].to_pylist(), table["neuron"].to_pylist()))
    mine = of_method.filter(pc.equal(of_method["concept"], concept)).sort_by("rank")
    return list(zip(mine["layer"].to_pylist(), mine["neuron"].to_pylist()))


def scores_by_neuron(rows, method: str, concept: str) -> dict[tuple[int, int], float]:
    part = rows.filter(pc.and_(pc.equal(rows["method"], method), pc.equal(rows["concept"], concept)))
    return dict(zip(zip(part["layer"].to_pylist(), part["neuron"].to_pylist()), part["score"].to_pylist()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="all")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--atlas", help="reuse or keep the atlas here (default: a temporary directory)")
    parser.add_argument("--run-id", default="compare-methods")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (neat is required)")
    parser.add_argument("--json", help="write the per-concept numbers here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    methods = [m for m in args.methods.split(",") if m]
    if NEAT not in methods:
        parser.error("--methods must include neat: the others are compared against it")

    with tempfile.TemporaryDirectory() as tmp:
        atlas = args.atlas or str(Path(tmp) / "atlas")
        if args.atlas and run_committed(atlas, args.run_id):  # validate an earlier run again
            meta = run_metadata(atlas, args.run_id)
            plan = resolve_job(job_config(atlas, args.layers, methods, args.run_id))
        else:
            plan, meta = run_all_methods(atlas, args.layers, methods, args.run_id)
        table = open_neurons(atlas).to_pyarrow_table()
        rows = table.filter(pc.equal(table["run_id"], args.run_id))

        model = load_model(plan.model, device="cpu")
        concepts = {c.name: c for c in load_concept_file(plan.config.concepts)}
        recorded = {c["name"]: tuple(c["target_ids"]) for c in meta["concepts"]}
        probes = {
            name: ConceptProbe(name, clean_pass(model, concept_vector(model, c.examples), recorded[name]),
                               recorded[name], tuple(concept_prompts(model.tokenizer, c, recorded[name])))
            for name, c in concepts.items()
        }
        zeros = ablation_values(model, "zero")
        texts = read_reference_texts()
        # NEG scores only a sample of neurons (the same for every concept): it checks NeurGrad instead.
        variants = [(m, False) for m in methods if m != "neg"] + [(NEAT, True)]
        per_concept = []
        for method, contrastive in variants:
            label = f"{method}/contrastive" if contrastive else method
            for name, probe in probes.items():
                top = ranking(rows, method, name, contrastive=contrastive)[:args.k]
                others = [p for n, p in probes.items() if n != name]
                result, = validate_ranking(model, probe, top, [args.k], others=others, ablate_to=zeros,
                                           layers=list(plan.layers), draws=args.draws, seed=0, neutral_texts=texts)
                other_tops = set().union(*(set(ranking(rows, method, n, contrastive=contrastive)[:args.k])
                                           for n in probes if n != name))
                neat_scores, mine = scores_by_neuron(rows, NEAT, name), scores_by_neuron(rows, method, name)
                common = sorted(set(neat_scores) & set(mine))
                rho = spearman(torch.tensor([neat_scores[k] for k in common]), torch.tensor([mine[k] for k in common]))
                per_concept.append({
                    "method": label, "concept": name, "k": result.k, "top_change": result.top_change,
                    "random_mean": result.random_mean, "z_score": result.z_score, "p_value": result.p_value,
                    "prompt_change": result.prompt_change, "prompt_random_mean": result.prompt_random_mean,
                    "other_mean_abs_change": statistics.mean(abs(v) for v in result.other_changes.values()),
                    "neutral_loss_change": result.neutral_loss_change,
                    "shared_top_k": sum(n in other_tops for n in top) / len(top),
                    "spearman_vs_neat": rho, "neurons_scored": len(mine),
                })
                print(f"{label:<18} {name:<20} top {result.top_change:+.3f} random {result.random_mean:+.4f} "
                      f"prompts {result.prompt_change:+.3f} others {per_concept[-1]['other_mean_abs_change']:.3f} "
                      f"shared {per_concept[-1]['shared_top_k']:.2f} rho {rho:.3f}", file=sys.stderr)

    print(f"\nSmolLM2-135M, {len(probes)} built-in concepts, layers {args.layers}, top-{args.k} of each method "
          f"ablated together (set to zero) vs {args.draws} random {args.k}-neuron draws; means over concepts of "
          f"absolute changes (a ranking by |score| holds neurons that raise and that lower a concept)\n")
    header = ("| method | concept vector: top-k | random | z | concept prompts: top-k | random "
              "| other concepts | neutral text loss | top-k shared with other concepts | Spearman vs NEAT | actor-s |")
    print(header)
    print("|---|" + "---:|" * (header.count("|") - 2))
    seconds = meta["timings"].get("methods", {})
    for method, contrastive in variants:
        label = f"{method}/contrastive" if contrastive else method
        mine = [r for r in per_concept if r["method"] == label]
        mean = lambda key: statistics.mean(abs(r[key]) for r in mine)  # noqa: E731
        print(f"| {label} | {mean('top_change'):.3f} | {mean('random_mean'):.4f} | {mean('z_score'):.1f} | "
              f"{mean('prompt_change'):.3f} | {mean('prompt_random_mean'):.4f} | {mean('other_mean_abs_change'):.3f} | "
              f"{statistics.mean(r['neutral_loss_change'] for r in mine):+.4f} | {mean('shared_top_k'):.2f} | "
              f"{statistics.mean(r['spearman_vs_neat'] for r in mine):.3f} | "
              f"{'' if contrastive else round(seconds.get(method, 0))} |")
    checks = meta.get("checks", {})
    if checks.get("neg_vs_neurgrad"):
        rhos = [c["spearman_signed"] for c in checks["neg_vs_neurgrad"]]
        print(f"\nneg (not in the table: it scores a sample, {checks['neg_vs_neurgrad'][0]['neurons']} neurons, "
              f"to check NeurGrad; actor-s {round(seconds.get('neg', 0))}): NeurGrad vs NEG Spearman "
              f"{statistics.mean(rhos):.3f} (signed values, mean over concepts)")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_concept": per_concept, "checks": checks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
