"""`neuron-atlas validate`: is a concept's ranking causal and specific? Ablate the top-k neurons of a
committed run together, against random neurons, other concepts and neutral text; store and show it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import datetime, timezone

import pyarrow as pa

from attribution.baseline_cache import DEFAULT_DRAWS, DEFAULT_KS, DEFAULT_SEED
from jobs.specific_query import METHOD_HELP, resolve_method


def register(sub) -> None:
    parser = sub.add_parser("validate", help="ablate a concept's top-k neurons vs random ones; stored in the atlas")
    parser.add_argument("--atlas", required=True)
    parser.add_argument("--concept", required=True)
    parser.add_argument("--model")
    parser.add_argument("--method", help=METHOD_HELP)
    parser.add_argument("--ablation", help="which rows rank the neurons: zero | mean | range | none "
                                           "(default: the run's first for the method)")
    parser.add_argument("--intervention", choices=("zero", "mean", "range"),
                        help="what the ablated neurons are set to (default: the rows' ablation, zero for "
                             "methods without one); range: the neutral mean, only inside the concept's "
                             "NeuronLens activation range")
    parser.add_argument("--run", "--run-id", dest="run_id", help="a specific run id instead of the latest")
    parser.add_argument("--rank-by", choices=("specific", "score", "contrastive"), default="specific",
                        help="which top-k to ablate: the specific ranking (default, when the run holds the "
                             "reference contrast; else score), raw score, or the contrastive score (see query)")
    parser.add_argument("--panel", help="a concept file whose concepts join the panel the specificity is measured "
                                        "against (always: the run's other concepts and the reference set)")
    parser.add_argument("--k", default=",".join(map(str, DEFAULT_KS)), help="comma-separated sizes of the ablated top set")
    parser.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="random k-neuron sets per k")
    parser.add_argument("--panel-prompts", default="all",
                        help="how many prompts of each panel concept the top-k is also ablated on (specificity on "
                             "real text): all (default: the prompts the run's measured choice used), N, or 0: none")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(handler=cmd_validate)


def _parse_ks(text: str) -> list[int]:
    from jobs.cli import UsageError

    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--k {text!r}: expected comma-separated positive integers like 1,5,10,50") from None
    if not ks or ks[0] < 1:
        raise UsageError(f"--k {text!r}: expected comma-separated positive integers like 1,5,10,50")
    return ks


def _parse_panel_prompts(text: str) -> int | None:
    """--panel-prompts: "all" -> None (every prompt), else a count >= 0."""
    from jobs.cli import UsageError

    if text.strip().lower() == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise UsageError(f"--panel-prompts {text!r}: expected all, or 0 or more prompts per panel concept")
    return count


def cmd_validate(args: argparse.Namespace) -> int:
    from attribution.ablation import ablation_values, read_reference_texts, reference_means
    from attribution.concepts import load_concept_file, resolve_targets
    from attribution.errors import ConceptError
    from attribution.models import load_model, resolve_model_source
    from attribution.neat import clean_passes
    from attribution.vector_cache import cached_concept_vectors
    from attribution.prompts import concept_prompts
    from attribution.validation import ConceptProbe, validate_ranking
    from jobs.cli import UsageError
    from storage.read import run_metadata, top_neurons
    from storage.validation import VALIDATION_SCHEMA, append_validations

    from storage.preflight import check_atlas_writable

    ks = _parse_ks(args.k)
    check_atlas_writable(args.atlas)  # validate stores its rows: fail before minutes of compute, not after
    resolve_method(args)
    if args.draws < 2:
        raise UsageError(f"--draws {args.draws}: expected at least 2 random draws")
    panel_prompts = _parse_panel_prompts(args.panel_prompts)
    head = top_neurons(args.atlas, concept=args.concept, model=args.model, method=args.method,
                       ablation=args.ablation, run_id=args.run_id, top=1)
    run_id, model_name = head.column("run_id")[0].as_py(), head.column("model")[0].as_py()
    ablation = args.ablation or head.column("ablation")[0].as_py()
    meta = run_metadata(args.atlas, run_id)
    rank_by = args.rank_by
    if rank_by == "contrastive":
        from storage.contrast import contrastive_neurons

        top, _, _ = contrastive_neurons(args.atlas, concept=args.concept, model=model_name, method=args.method,
                                        ablation=ablation, run_id=run_id, top=max(ks))
    elif rank_by == "specific":
        from jobs.specific_query import specific_or_score

        ranked = specific_or_score(args.atlas, concept=args.concept, model=model_name, method=args.method,
                                   ablation=ablation, run_id=run_id, top=max(ks))
        top, rank_by = ranked.table, ranked.ranking
        print(ranked.note, file=sys.stderr)
    else:
        top = top_neurons(args.atlas, concept=args.concept, model=model_name, method=args.method,
                          ablation=ablation, run_id=run_id, top=max(ks))
    neurons = [(row["layer"], row["neuron"]) for row in top.select(["layer", "neuron"]).to_pylist()]
    method = args.method if rank_by == "score" else f"{args.method}/{rank_by}"

    intervention = args.intervention or (ablation if ablation in ("zero", "mean", "range") else "zero")
    print(f"validating {args.concept} ({method}, {ablation}; set to {intervention}) of run {run_id}: "
          f"loading {meta['config']['model']}", file=sys.stderr)
    model = load_model(resolve_model_source(meta["config"]["model"]), device=args.device)
    if not model.has_lm_head:  # validation measures log p(targets): it needs the model's LM head
        raise UsageError(f"model {model_name} of run {run_id} is an encoder (no LM head): validate ablates "
                         f"neurons and measures log p of the concept's targets, which needs a causal LM")
    recorded = {c["name"]: tuple(c["target_ids"]) for c in meta["concepts"]}
    say = lambda message: print(f"validate: {message}", file=sys.stderr, flush=True)  # noqa: E731
    # (concept, target ids, prompts) of the run's concepts, then of the panel (the reference set, --panel)
    members = []
    for concept in load_concept_file(meta["config"]["concepts"]):
        if concept.name not in recorded:
            continue
        # A concept without targets in its file ran with targets the actors derived: use the recorded ones.
        targets = resolve_targets(model.tokenizer, concept).ids or recorded[concept.name]
        if targets != recorded[concept.name]:
            raise ConceptError(f"concept {concept.name!r} in {meta['config']['concepts']} no longer has the targets "
                               f"run {run_id} used ({recorded[concept.name]}); validate against the file it ran with")
        words = concept.targets or tuple(next(c for c in meta["concepts"] if c["name"] == concept.name)["target_words"])
        members.append((concept, targets, tuple(concept_prompts(model.tokenizer, replace(concept, targets=words), targets))))
    run_concepts = {concept.name for concept, _, _ in members}
    say(f"panel: {len(run_concepts) - 1} other concepts of the run, the reference set"
        f"{' and ' + args.panel if args.panel else ''}")
    members += [(concept, targets, tuple(concept_prompts(model.tokenizer, concept, targets)))
                for concept, targets in panel_concepts(model, args.panel, exclude=run_concepts)]
    # Every concept vector in shared, length-sorted batches, or from the cache the run's reference
    # contrast filled (attribution/vector_cache.py).
    vectors = cached_concept_vectors(model, {concept.name: concept.examples for concept, _, _ in members})
    # Every concept's clean log p(T) in one batched forward (validation needs no clean trajectory).
    cleans = clean_passes(model, [vectors[concept.name] for concept, _, _ in members],
                          [targets for _, targets, _ in members], trajectory=False)
    probes = {concept.name: ConceptProbe(concept.name, clean, targets, prompts)
              for (concept, targets, prompts), clean in zip(members, cleans)}
    texts = read_reference_texts()
    reference = reference_means(model, texts) if intervention in ("mean", "range") else None
    ablate_to = ablation_values(model, "mean" if intervention == "range" else intervention, reference)
    ranges = None
    if intervention == "range":
        from attribution.neuronlens import neuronlens_scores

        concept = next(c for c in load_concept_file(meta["config"]["concepts"]) if c.name == args.concept)
        tau = meta["config"].get("method_options", {}).get("range_tau", 2.0)
        lens = neuronlens_scores(model, concept, tau=tau)
        ranges = (lens.extra["range_low"], lens.extra["range_high"])
    # The panel on real text: each other concept's prompts, or its first --panel-prompts (0: none).
    others = [replace(p, prompts=p.prompts[:panel_prompts]) for n, p in probes.items() if n != args.concept]
    random_prompts = None
    if probes[args.concept].prompts:
        # The random draws on the concept's prompts do not depend on the ranking: from the cache the
        # run's measured choice (or an earlier validate) filled, else computed and stored.
        from attribution.baseline_cache import cached_random_prompt_changes

        random_prompts, cached = cached_random_prompt_changes(
            model, probes[args.concept].prompts, ablate_to, ranges, layers=list(meta["layers"]), ks=ks,
            draws=args.draws, seed=args.seed)
        say(f"own prompts: the random draws' changes ({len(ks)} k x {args.draws}) "
            + ("from the cache (NEURON_ATLAS_CACHE/validate-baselines)" if cached else "computed and cached"))
    results = validate_ranking(
        model, probes[args.concept], neurons, ks, others=others,
        ablate_to=ablate_to, ranges=ranges, layers=list(meta["layers"]), draws=args.draws,
        seed=args.seed, neutral_texts=texts, random_prompts=random_prompts, progress=say,
    )
    shared = _shared_top_k(args.atlas, neurons, ks, concept=args.concept,
                           others=[n for n in run_concepts if n != args.concept],
                           model=model_name, method=args.method, ablation=ablation, run_id=run_id)
    now = datetime.now(timezone.utc)
    rows = pa.Table.from_pylist([
        {"run_id": run_id, "model": model_name, "concept": r.concept, "method": method, "ablation": ablation,
         "k": r.k, "top_change": r.top_change, "random_mean": r.random_mean, "random_std": r.random_std,
         "z_score": r.z_score, "p_value": r.p_value, "draws": r.draws,
         "other_changes_json": json.dumps(r.other_changes, sort_keys=True),
         "neutral_loss_change": r.neutral_loss_change, "created_at": now, "intervention": intervention,
         "prompt_change": r.prompt_change, "prompt_random_mean": r.prompt_random_mean, "shared_top_k": shared[r.k],
         "specificity": specificity(r), "panel": len(r.other_changes),
         "prompt_specificity": prompt_specificity(r),
         "prompt_other_changes_json": json.dumps(r.prompt_other_changes, sort_keys=True) if r.prompt_other_changes else None}
        for r in results
    ], schema=VALIDATION_SCHEMA)
    try:
        append_validations(args.atlas, rows)
        unsaved = None
    except Exception as err:  # noqa: BLE001  the results are still shown; the failure is reported after them
        unsaved = err
    code = _show(args, rows, results, shared, stored=unsaved is None)
    if unsaved is not None:
        from jobs.cli import EXIT_FAILED, say_error

        say_error("validate", f"the results above were not stored in {args.atlas}/validations: "
                              f"{type(unsaved).__name__}: {unsaved}", "failed")
        return EXIT_FAILED
    return code


def _show(args: argparse.Namespace, rows: pa.Table, results: list, shared: dict[int, float], *,
          stored: bool) -> int:
    from jobs.cli import write_table

    if args.format == "json":
        out = rows.drop_columns(["other_changes_json", "prompt_other_changes_json"]).to_pylist()
        for row, r in zip(out, results):
            row["other_changes"] = r.other_changes
            row["prompt_other_changes"] = r.prompt_other_changes
            row["created_at"] = row["created_at"].isoformat()
        print(json.dumps(out))
        return 0
    from cluster.config import PROMPT_METHODS

    method, run_id = rows.column("method")[0].as_py(), rows.column("run_id")[0].as_py()
    # A ranking made on the prompts is judged on the prompts first; the concept vector is the other probe.
    on_prompts = method.split("/")[0] in PROMPT_METHODS
    shown = []
    for r in results:
        vector = {"top_change": r.top_change, "random": f"{r.random_mean:+.4f} ± {r.random_std:.4f}",
                  "z": r.z_score, "p": r.p_value, "specificity": specificity(r),
                  "most_moved_other": _most_moved(r.other_changes)}
        prompts = {"prompt_change": r.prompt_change, "prompt_random": r.prompt_random_mean,
                   "prompt_specificity": prompt_specificity(r),
                   "most_moved_other_prompts": _most_moved(r.prompt_other_changes)}
        rest = {"shared_top_k": shared[r.k], "neutral_loss_change": r.neutral_loss_change}
        if on_prompts:  # the vector's columns renamed, so that "specificity" is not read as this ranking's
            vector = {f"vector_{key.removeprefix('top_')}": value for key, value in vector.items()}
            shown.append({"k": r.k, **prompts, **vector, **rest})
        else:
            shown.append({"k": r.k, **vector, **prompts, **rest})
    write_table(pa.Table.from_pylist(shown), "table")
    panel = len(results[0].other_changes) if results else 0
    panel_note = (f"the largest |change| of the {panel} other concepts of the panel (the run's, the reference "
                  f"set's{', --panel' if args.panel else ''})")
    if on_prompts:
        what = (f"prompt_change: change of mean log p(gold) over the concept's prompts in nats when the top-k are "
                f"ablated together; prompt_specificity: |prompt_change| / {panel_note} on their prompts; "
                f"vector_*: the same on the concept vector (log p(T)); random: {args.draws} draws of k neurons "
                f"from the run's layers")
    else:
        what = (f"log p(T) change of the concept vector in nats when the top-k are ablated together (prompt_change: "
                f"log p(gold) on the concept's prompts); random: {args.draws} draws of k neurons from the run's "
                f"layers; specificity: |top_change| / {panel_note}")
    print(f"{method} top-k of run {run_id}; {what}; shared_top_k: share also top-k for another concept"
          f"{f'; stored in {args.atlas}/validations' if stored else ''}", file=sys.stderr)
    return 0


def _shared_top_k(atlas: str, neurons: list[tuple[int, int]], ks: list[int], *, concept: str, others: list[str],
                  model: str, method: str, ablation: str, run_id: str) -> dict[int, float]:
    """k -> share of the concept's top-k that rank in the top-k (by score) of another concept of the run."""
    from storage.read import top_neurons

    if not others:
        return {k: float("nan") for k in ks}
    ranked = {}
    for other in others:
        rows = top_neurons(atlas, concept=other, model=model, method=method, ablation=ablation, run_id=run_id,
                           top=max(ks)).select(["layer", "neuron"]).to_pylist()
        ranked[other] = [(r["layer"], r["neuron"]) for r in rows]
    out = {}
    for k in ks:
        theirs = set().union(*(set(r[:k]) for r in ranked.values()))
        mine = neurons[:k]
        out[len(mine)] = sum(n in theirs for n in mine) / len(mine) if mine else float("nan")
    return out


def prompt_specificity(result) -> float | None:
    """On real text: |own prompt change| / the largest |change| on a panel concept's prompts."""
    if result.prompt_change is None or not result.prompt_other_changes:
        return None
    worst = max(abs(v) for v in result.prompt_other_changes.values())
    return abs(result.prompt_change) / worst if worst > 0 else None


def _most_moved(changes: dict[str, float]) -> str:
    if not changes:
        return "-"
    name = max(changes, key=lambda n: abs(changes[n]))
    return f"{name} {changes[name]:+.3f}"


def specificity(result) -> float | None:
    """|own change| / the largest |change| of another panel concept (None without a panel)."""
    if not result.other_changes:
        return None
    worst = max(abs(v) for v in result.other_changes.values())
    return abs(result.top_change) / worst if worst > 0 else None


def panel_concepts(model, panel_file: str | None, *, exclude: set[str]):
    """(concept, target ids) of the reference set and of `panel_file`, minus names in `exclude`."""
    from attribution.concepts import load_concept_file, resolve_targets
    from attribution.errors import ConceptError
    from attribution.reference import reference_concepts

    concepts = reference_concepts() + (load_concept_file(panel_file) if panel_file else [])
    seen = set(exclude)
    for concept in concepts:
        if concept.name in seen or not concept.targets:
            continue
        seen.add(concept.name)
        try:
            targets = resolve_targets(model.tokenizer, concept).ids
        except ConceptError:
            if concept in concepts[:len(reference_concepts())]:
                continue  # a reference target this tokenizer cannot encode: the panel goes without it
            raise
        yield concept, targets
