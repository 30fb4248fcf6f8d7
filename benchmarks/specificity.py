"""Benchmark: how concept-specific is each ranking's top-10? Raw NEAT, the run-contrastive ranking and
the specific ranking side by side, on the 6 built-in concepts and on held-out concepts.

For each evaluated concept: exact NEAT effects (float32 engine; on AtP's top `--screen` neurons, AtP
elsewhere, which held every one of NEAT's top-100 in bench_atp), AtP effects of every neuron on the
35 reference concepts, and the rankings:
  neat         raw NEAT, by |effect|
  contrastive  NEAT score minus the best score for another concept of the run (storage/contrast.py)
  specific     the default (attribution/specificity.py): greedy set selection against the reference
               set's AtP effects and the run's other concepts
  specific-alone the same for a run that holds only this concept (reference set only)
A "run" is the 6 built-ins (the demo) or the 10 held-out concepts (benchmarks/data/heldout_concepts.yaml,
never used for tuning or tests). Each ranking's top-10 is ablated together (zero) on the concept
vector of the concept and of every concept of the panel (all other built-in, reference and held-out
concepts, 50): specificity = |own change| / max |other change|. Also: the own change against raw
NEAT's, and the change of next-token loss on configs/reference/neutral.txt.

With --prompts, the same on real text (attribution/prompt_effects.py): each concept's cloze prompts
give in-distribution effects (AtP on the prompts for every neuron, exact for AtP's top `--prompt-screen`
by |estimate|), two more rankings are built from them:
  prompt-carry     the neurons whose exact ablation lowers the concept's log p(gold) most (signed)
  prompt-specific  the greedy set selection on those signed effects against the reference concepts'
                   and the run's other concepts' prompt AtP effects, among neurons that carry the concept
  prompt-run       what a run's `prompt` method ranks (storage/specificity.py): exact prompt effects of
                   the candidates of attribution/specificity.py: prompt_candidates (AtP's top `--prompt-screen`
                   by |estimate| and the first `--prompt-screen` of the carry-specific selection on the
                   estimates), the carry-specific selection among them
  prompt-measured  what a run's `prompt` method ranks since its measured choice (attribution/measured_selection.py):
                   prompt-run's selection at penalties 1-40, each distinct top-k ablated on the concept's
                   prompts and on every prompt of the reference concepts and the run's other concepts (the
                   panel validate measures on); the penalty-10 set when it measures >= 5, else the most
                   specific measured set
  prompt-specific-pP, prompt-run-pP  the same with penalty P, for each P of --prompt-penalties
and every ranking's top-10 is also ablated on the concept's prompts and on the prompts of each panel
concept (all, or the first `--panel-prompts`): prompt specificity = |own change of mean log p(gold)| /
max |panel concept's change|; "against the other group only" divides by the largest change of the
other group's concepts (held-out for the built-ins, built-ins for the held-out), which no selection of
the run saw: how far the specificity carries beyond the contrast set.

Usage: python benchmarks/specificity.py [--threads 2] [--k 10] [--screen 2000] [--cache DIR] [--no-neutral]
       [--prompts [--prompt-screen 100] [--panel-prompts N] [--prompt-penalties 1,10]] [--rankings a,b]
       [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from attribution.ablation import read_reference_texts  # noqa: E402
from attribution.atp import atp_effects, log_p_gradients  # noqa: E402
from attribution.concepts import load_concept_file, resolve_targets  # noqa: E402
from attribution.masking import layer_masks  # noqa: E402
from attribution.measured_selection import candidate_sets, choose_set, measure_sets  # noqa: E402
from attribution.models import load_model, resolve_model_source  # noqa: E402
from attribution.neat import clean_pass, concept_vector, neat_effects  # noqa: E402
from attribution.prompt_effects import prompt_atp, prompt_neuron_effects, prompt_set_changes  # noqa: E402
from attribution.prompts import concept_prompts  # noqa: E402
from attribution.specificity import carry_specific_order, prompt_candidates, specific_order  # noqa: E402
from attribution.validation import ConceptProbe, neutral_loss, vector_changes  # noqa: E402

BUILTIN = ROOT / "configs" / "concepts" / "builtin.yaml"
REFERENCE = ROOT / "configs" / "concepts" / "reference.yaml"
HELDOUT = ROOT / "benchmarks" / "data" / "heldout_concepts.yaml"


def concept_data(model, concepts, cache: Path | None, group: str, *, screen: int | None):
    """name -> {probe, atp [n], neat [n] (screened exact, when `screen`)}; cached per concept."""
    out = {}
    zeros = torch.zeros(model.d_mlp)
    for concept in concepts:
        path = cache / f"{group}-{screen}-{concept.name}.pt" if cache else None
        if path is not None and path.exists():
            entry = torch.load(path)
        else:
            started = time.perf_counter()
            targets = resolve_targets(model.tokenizer, concept).ids
            clean = clean_pass(model, concept_vector(model, concept.examples, concept=concept.name), targets)
            grads = log_p_gradients(model, clean, targets)
            atp = torch.cat([atp_effects(grads, clean, layer, range(model.d_mlp), zeros)
                             for layer in range(model.n_layers)])  # [n_layers * d_mlp]
            entry = {"vector": clean.vector, "targets": targets, "atp": atp}
            if screen:
                exact = atp.clone()
                picks = atp.abs().topk(screen).indices
                for layer in range(model.n_layers):
                    mine = sorted(int(i) % model.d_mlp for i in picks if int(i) // model.d_mlp == layer)
                    if mine:
                        values = neat_effects(model, clean, targets, layer, tuple(mine), zeros)
                        exact[[layer * model.d_mlp + i for i in mine]] = values
                entry["neat"] = exact
            print(f"{group}: {concept.name} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(entry, path)
        clean = clean_pass(model, entry["vector"], entry["targets"])
        out[concept.name] = {**entry, "probe": ConceptProbe(concept.name, clean, entry["targets"])}
    return out


def prompt_data(model, concepts, cache: Path | None, group: str, *, screen: int):
    """name -> {prompts, atp [n] (prompt AtP, zero ablation), exact [n] (screened exact prompt effects
    where `screen`, AtP elsewhere)}; cached per concept."""
    out = {}
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    for concept in concepts:
        path = cache / f"prompts-{group}-{screen}-{concept.name}.pt" if cache else None
        prompts = concept_prompts(model.tokenizer, concept, resolve_targets(model.tokenizer, concept).ids)
        if path is not None and path.exists():
            entry = torch.load(path)
        else:
            started = time.perf_counter()
            atp = prompt_atp(model, prompts, zeros).flatten()  # [n_layers * d_mlp]
            entry = {"atp": atp}
            if screen:
                picks = atp.abs().topk(screen).indices.tolist()
                neurons = [(i // model.d_mlp, i % model.d_mlp) for i in picks]
                changes = torch.tensor(prompt_set_changes(model, [(p, [n]) for n in neurons for p in prompts], zeros))
                exact = atp.clone()
                exact[picks] = changes.view(len(picks), len(prompts)).mean(dim=1).float()
                entry["exact"] = exact
            print(f"prompts {group}: {concept.name} ({len(prompts)} prompts) in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(entry, path)
        out[concept.name] = {**entry, "prompts": prompts}
    return out


def candidate_effects(model, entry: dict, off: torch.Tensor, cache: Path | None, key: str, *, screen: int):
    """What a run's prompt method scores: exact prompt effects (zero ablation) of the concept's candidates
    (attribution/specificity.py: prompt_candidates), zero elsewhere: [n]; cached per concept."""
    picks = prompt_candidates(entry["atp"], off, top=screen).tolist()
    path = cache / f"prompts-{key}-{screen}-candidates.pt" if cache else None
    known = torch.load(path) if path is not None and path.exists() else {}
    todo = [i for i in picks if i not in known]
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    for layer in sorted({i // model.d_mlp for i in todo}):
        neurons = [i % model.d_mlp for i in todo if i // model.d_mlp == layer]
        values = prompt_neuron_effects(model, entry["prompts"], layer, neurons, zeros)
        known.update({layer * model.d_mlp + n: float(v) for n, v in zip(neurons, values)})
    if todo and path is not None:
        torch.save(known, path)
    out = torch.zeros_like(entry["atp"])
    out[picks] = torch.tensor([known[i] for i in picks])
    return out


def estimated_specificity(effect: torch.Tensor, off: torch.Tensor, chosen: torch.Tensor) -> float:
    """First-order specificity of ablating `chosen` together: |sum of own effects| / the largest |sum
    of a contrast concept's effects| (effect [n], off [r, n], chosen [m] int64)."""
    own = float(effect[chosen].double().sum().abs())
    worst = float(off[:, chosen].double().sum(dim=1).abs().max()) if off.shape[0] else 0.0
    return own / worst if worst > 0 else float("inf")


def carry_order(effect: torch.Tensor) -> torch.Tensor:
    """Neurons whose ablation lowers the concept's targets most first (signed effects [n])."""
    return effect.argsort(stable=True)


def contrastive_order(neat: dict[str, torch.Tensor], concept: str) -> torch.Tensor:
    """storage/contrast.py's ranking on tensors: score minus the best score of another run concept."""
    others = torch.stack([v.abs() for n, v in neat.items() if n != concept])
    return (neat[concept].abs() - others.max(dim=0).values).argsort(descending=True, stable=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--screen", type=int, default=2000)
    parser.add_argument("--penalty", type=float, default=None, help="override the specific ranking's penalty")
    parser.add_argument("--penalties", default="", help="also rank with these penalties (comma-separated), "
                                                        "as rankings specific-pP")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--no-neutral", action="store_true")
    parser.add_argument("--prompts", action="store_true", help="also rank and measure on real prompts")
    parser.add_argument("--prompt-screen", type=int, default=100, help="neurons scored exactly on prompts per concept")
    parser.add_argument("--panel-prompts", type=int, default=None,
                        help="prompts per panel concept on real text (default: all of them, as validate)")
    parser.add_argument("--prompt-penalties", default="", help="also rank prompt-specific with these penalties")
    parser.add_argument("--rankings", default="", help="measure only these rankings (comma-separated; default all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_model(resolve_model_source("smollm2-135m"), device="cpu")
    reference = concept_data(model, load_concept_file(REFERENCE), args.cache, "reference", screen=None)
    runs = {"builtin": concept_data(model, load_concept_file(BUILTIN), args.cache, "builtin", screen=args.screen),
            "heldout": concept_data(model, load_concept_file(HELDOUT), args.cache, "heldout", screen=args.screen)}
    everyone = {**reference, **runs["builtin"], **runs["heldout"]}
    prompt_runs, everyone_prompts, reference_prompt_atp, reference_p = {}, {}, None, {}
    if args.prompts:
        reference_p = prompt_data(model, load_concept_file(REFERENCE), args.cache, "reference", screen=0)
        prompt_runs = {"builtin": prompt_data(model, load_concept_file(BUILTIN), args.cache, "builtin",
                                              screen=args.prompt_screen),
                       "heldout": prompt_data(model, load_concept_file(HELDOUT), args.cache, "heldout",
                                              screen=args.prompt_screen)}
        everyone_prompts = {**reference_p, **prompt_runs["builtin"], **prompt_runs["heldout"]}
        reference_prompt_atp = torch.stack([d["atp"] for d in reference_p.values()])  # [35, n]
    reference_atp = torch.stack([d["atp"] for d in reference.values()])  # [35, n]
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    texts = read_reference_texts()
    clean_loss = None if args.no_neutral else neutral_loss(model, texts)
    penalty = {} if args.penalty is None else {"penalty": args.penalty}
    rows = []
    for group, run in runs.items():
        neat = {name: d["neat"] for name, d in run.items()}
        for name, data in run.items():
            effect = data["neat"]
            estimates = {}  # ranking -> the selection's first-order specificity of its top-k (prompt-run rankings)
            run_others = torch.stack([v for n, v in neat.items() if n != name])
            orders = {
                "neat": effect.abs().argsort(descending=True, stable=True),
                "contrastive": contrastive_order(neat, name),
                "specific": specific_order(effect, torch.cat([reference_atp, run_others]), k=args.k, **penalty),
                "specific-alone": specific_order(effect, reference_atp, k=args.k, **penalty),
            }
            if args.prompts:
                mine_p = prompt_runs[group][name]
                others_p = torch.stack([d["atp"] for n, d in prompt_runs[group].items() if n != name])
                orders["prompt-carry"] = carry_order(mine_p["exact"])
                orders["prompt-specific"] = carry_specific_order(
                    mine_p["exact"], torch.cat([reference_prompt_atp, others_p]), k=args.k, **penalty)
                off_p = torch.cat([reference_prompt_atp, others_p])
                scored = candidate_effects(model, mine_p, off_p, args.cache, f"{group}-{name}", screen=args.prompt_screen)
                orders["prompt-run"] = carry_specific_order(scored, off_p, k=args.k, **penalty)
                if not args.rankings or "prompt-measured" in args.rankings.split(","):
                    # The penalties' top-k sets measured exactly on the own prompts and on every prompt of
                    # the reference and the run's other concepts (attribution/measured_selection.py).
                    contrast = {n: d["prompts"] for n, d in {**reference_p, **prompt_runs[group]}.items() if n != name}
                    all_neurons = [(i // model.d_mlp, i % model.d_mlp) for i in range(scored.numel())]
                    measures = measure_sets(model, candidate_sets(scored, off_p, all_neurons, k=args.k),
                                            mine_p["prompts"], contrast, zeros)
                    best = choose_set(measures)
                    print(f"{group}/{name}: measured " + ", ".join(
                        f"p{m.penalty:g} {m.specificity:.2f} ({m.own_change:+.3f})" for m in measures)
                        + f" -> p{best.penalty:g}", file=sys.stderr, flush=True)
                    orders["prompt-measured"] = torch.tensor([layer * model.d_mlp + i for layer, i in best.neurons])
                for p in [float(x) for x in args.prompt_penalties.split(",") if x.strip()]:
                    orders[f"prompt-specific-p{p:g}"] = carry_specific_order(mine_p["exact"], off_p, k=args.k, penalty=p)
                    orders[f"prompt-run-p{p:g}"] = carry_specific_order(scored, off_p, k=args.k, penalty=p)
                # What the selection expects of each top-k: first-order specificity on the run's estimates.
                estimates = {ranking: estimated_specificity(scored, off_p, order[:args.k])
                             for ranking, order in orders.items() if ranking.startswith("prompt-run")}
            for p in [float(x) for x in args.penalties.split(",") if x.strip()]:
                orders[f"specific-p{p:g}"] = specific_order(effect, torch.cat([reference_atp, run_others]),
                                                            k=args.k, penalty=p)
            if args.rankings:
                wanted = args.rankings.split(",")
                orders = {key: order for key, order in orders.items() if key in wanted or key == "neat"}
            panel = [d["probe"] for n, d in everyone.items() if n != name]
            tops = {ranking: [(int(i) // model.d_mlp, int(i) % model.d_mlp) for i in order[:args.k]]
                    for ranking, order in orders.items()}
            # One batched pass: every ranking's top-k on the concept and on every panel concept.
            changes = vector_changes(model, [(p, top) for top in tops.values() for p in [data["probe"], *panel]],
                                     zeros)
            prompt_side = {}
            if args.prompts:
                # Every ranking's top-k on the concept's prompts and on a few prompts of each panel concept.
                own_prompts = everyone_prompts[name]["prompts"]
                panel_prompts = {n: d["prompts"][:args.panel_prompts] for n, d in everyone_prompts.items() if n != name}
                outside_names = {n for g, concepts in prompt_runs.items() if g != group for n in concepts}
                rows_p = [(p, top) for top in tops.values() for p in own_prompts]
                rows_p += [(p, top) for top in tops.values() for ps in panel_prompts.values() for p in ps]
                got = prompt_set_changes(model, rows_p, zeros)
                per_ranking = len(own_prompts)
                for j, ranking in enumerate(tops):
                    own_p = statistics.fmean(got[j * per_ranking:(j + 1) * per_ranking])
                    prompt_side[ranking] = {"own": own_p}
                at = len(tops) * per_ranking
                for j, ranking in enumerate(tops):
                    changes_p = {}
                    for n, ps in panel_prompts.items():
                        changes_p[n] = statistics.fmean(got[at:at + len(ps)])
                        at += len(ps)
                    worst_p = max(changes_p, key=lambda n: abs(changes_p[n]))
                    # Outside the contrast: the other group's concepts, which no selection of this run saw.
                    outside = max(abs(v) for n, v in changes_p.items() if n in outside_names)
                    prompt_side[ranking].update(worst=worst_p, worst_change=changes_p[worst_p],
                                                specificity=abs(prompt_side[ranking]["own"]) / max(abs(changes_p[worst_p]), 1e-9),
                                                lowers_ratio=-prompt_side[ranking]["own"] / max(max(-v for v in changes_p.values()), 1e-9),
                                                outside=abs(prompt_side[ranking]["own"]) / max(outside, 1e-9))
            for j, (ranking, top) in enumerate(tops.items()):
                mine = changes[j * (len(panel) + 1):(j + 1) * (len(panel) + 1)]
                own, others = mine[0], mine[1:]
                worst = max(range(len(panel)), key=lambda i: abs(others[i]))
                loss = None if clean_loss is None else neutral_loss(model, texts, layer_masks(top, zeros)) - clean_loss
                rows.append({"group": group, "concept": name, "ranking": ranking, "own_change": own,
                             "worst_other": panel[worst].name, "worst_other_change": others[worst],
                             "specificity": abs(own) / max(abs(others[worst]), 1e-9),
                             "layers": sorted({layer for layer, _ in top}), "neutral_loss_change": loss,
                             "prompt_own_change": prompt_side.get(ranking, {}).get("own"),
                             "prompt_worst_other": prompt_side.get(ranking, {}).get("worst"),
                             "prompt_worst_other_change": prompt_side.get(ranking, {}).get("worst_change"),
                             "prompt_specificity": prompt_side.get(ranking, {}).get("specificity"),
                             "prompt_lowers_ratio": prompt_side.get(ranking, {}).get("lowers_ratio"),
                             "prompt_specificity_outside": prompt_side.get(ranking, {}).get("outside"),
                             "estimated_prompt_specificity": estimates.get(ranking)})
            print(f"{group}/{name}: " + "  ".join(
                f"{r['ranking']} {r['specificity']:.2f} ({r['own_change']:+.2f})"
                + (f" prompts {r['prompt_specificity']:.2f} ({r['prompt_own_change']:+.3f})" if args.prompts else "")
                + (f" est {r['estimated_prompt_specificity']:.2f}" if r["estimated_prompt_specificity"] else "")
                for r in rows[-len(orders):]), file=sys.stderr, flush=True)
    table = []
    for group in runs:
        for ranking in dict.fromkeys(r["ranking"] for r in rows):
            mine = [r for r in rows if r["group"] == group and r["ranking"] == ranking]
            raw = {r["concept"]: abs(r["own_change"]) for r in rows if r["group"] == group and r["ranking"] == "neat"}
            losses = [r["neutral_loss_change"] for r in mine if r["neutral_loss_change"] is not None]
            table.append({
                "group": group, "ranking": ranking,
                "median_specificity": statistics.median(r["specificity"] for r in mine),
                "min_specificity": min(r["specificity"] for r in mine),
                "median_own_change": statistics.median(abs(r["own_change"]) for r in mine),
                "median_own_vs_neat": statistics.median(abs(r["own_change"]) / raw[r["concept"]] for r in mine),
                "min_own_vs_neat": min(abs(r["own_change"]) / raw[r["concept"]] for r in mine),
                "median_neutral_loss_change": statistics.median(losses) if losses else None,
            })
            if args.prompts:
                raw_p = {r["concept"]: r["prompt_own_change"] for r in rows
                         if r["group"] == group and r["ranking"] == "neat"}
                table[-1].update(
                    median_prompt_specificity=statistics.median(r["prompt_specificity"] for r in mine),
                    median_prompt_lowers_ratio=statistics.median(r["prompt_lowers_ratio"] for r in mine),
                    median_prompt_specificity_outside=statistics.median(r["prompt_specificity_outside"] for r in mine),
                    reaching_5=sum(r["prompt_specificity"] >= 5 for r in mine),
                    median_prompt_own_change=statistics.median(r["prompt_own_change"] for r in mine),
                    share_lowering_at_least_raw=statistics.fmean(
                        float(r["prompt_own_change"] <= min(raw_p[r["concept"]], 0.0)) for r in mine))
    print("| concepts | ranking | median specificity | min | median own |change| | own vs raw NEAT: median | min | "
          "neutral loss change (median) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for t in table:
        loss = "" if t["median_neutral_loss_change"] is None else f"{t['median_neutral_loss_change']:+.3f}"
        print(f"| {t['group']} | {t['ranking']} | {t['median_specificity']:.2f} | {t['min_specificity']:.2f} | "
              f"{t['median_own_change']:.2f} | {t['median_own_vs_neat']:.2f} | {t['min_own_vs_neat']:.2f} | {loss} |")
    if args.prompts:
        print("\nOn real prompts (mean log p(gold) over each concept's cloze prompts, top-10 ablated together):")
        print("| concepts | ranking | median prompt specificity | concepts >= 5 | against the other group only | "
              "median own lowering / largest other lowering | median own change (nats) | "
              "share of concepts lowered at least as much as raw NEAT's top-10 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for t in table:
            print(f"| {t['group']} | {t['ranking']} | {t['median_prompt_specificity']:.2f} | "
                  f"{t['reaching_5']}/{len(runs[t['group']])} | {t['median_prompt_specificity_outside']:.2f} | "
                  f"{t['median_prompt_lowers_ratio']:.2f} | {t['median_prompt_own_change']:+.3f} | "
                  f"{t['share_lowering_at_least_raw']:.2f} |")
    print(f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"summary": table, "concepts": rows}, indent=1))


if __name__ == "__main__":
    main()
