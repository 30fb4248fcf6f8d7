"""The specific ranking for `query`, `validate`, `report` and the demo: read from the run's specificity
table (storage/specificity.py) when the run holds the reference contrast, else raw scores, saying which."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cluster.config import PROMPT_METHODS

SPECIFIC_COLUMNS = ["specific_rank", "layer", "neuron", "effect", "specificity", "off_target", "off_target_concept",
                    "rank", "generic", "ablation"]


@dataclass(frozen=True)
class Ranked:
    table: pa.Table  # the top rows, in ranking order
    ranking: str  # "specific" or "score" (the fallback)
    run_id: str
    model: str
    note: str  # one line for a person: which ranking this is


def specific_or_score(atlas, *, concept: str, model: str | None, method: str, ablation: str | None,
                      run_id: str | None, top: int, storage_options: dict | None = None) -> Ranked:
    """The concept's specific ranking when its run holds the reference contrast, else its raw ranking."""
    from storage.read import open_neurons, top_neurons
    from storage.specificity import has_specificity, specific_neurons

    raw = top_neurons(atlas, concept=concept, model=model, method=method, ablation=ablation, run_id=run_id,
                      top=top, storage_options=storage_options)
    run_id, model = raw.column("run_id")[0].as_py(), raw.column("model")[0].as_py()
    if not has_specificity(atlas, run_id=run_id, method=method, storage_options=storage_options):
        return Ranked(raw, "score", run_id, model,
                      f"ranked by score (raw {method}): run {run_id} has no reference contrast "
                      f"(reference_contrast: false, or a run older than the specific ranking)")
    rows = specific_neurons(atlas, run_id=run_id, concept=concept, method=method, ablation=ablation, top=top,
                            storage_options=storage_options)
    import pyarrow.dataset as pds

    ranks = open_neurons(atlas, storage_options).to_pyarrow_dataset().to_table(
        columns=["ablation", "layer", "neuron", "rank"],
        filter=(pds.field("run_id") == run_id) & (pds.field("concept") == concept) & (pds.field("method") == method)
        & pc.is_in(pds.field("layer"), pa.array(sorted(set(rows["layer"].to_pylist())), pa.int32())))
    rows = rows.join(ranks, keys=["ablation", "layer", "neuron"], join_type="left outer")
    rows = rows.sort_by([("ablation", "ascending"), ("specific_rank", "ascending")])
    if method in PROMPT_METHODS:
        note = (f"ranked by specificity (a set of neurons that carry {concept}: ablated, they lower its gold tokens "
                f"on its own prompts much more than any reference or run concept's; raw {method}: --rank-by score)")
    else:
        note = (f"ranked by specificity (a set of neurons that moves {concept} much more than any of the "
                f"reference concepts and the run's other concepts; raw {method}: --rank-by score)")
    return Ranked(rows, "specific", run_id, model, note)


METHOD_HELP = ("scoring method whose rows to read: neat | atp | prompt | prompt-atp | neurgrad | neg | neuronlens | "
               "selectivity | ig (default: prompt where the run scored it, the in-distribution method, else neat)")


def resolve_method(args) -> str:
    """--method, or by default prompt where the concept's run scored it (the in-distribution method,
    whose specific ranking is measured on real text), else neat. Sets args.method; says so on stderr."""
    if args.method is not None:
        return args.method
    from storage.errors import AtlasError
    from storage.read import top_neurons

    try:
        top_neurons(args.atlas, concept=args.concept, model=args.model, method="prompt",
                    run_id=args.run_id, top=1, as_of=getattr(args, "as_of", None))
    except AtlasError:  # no prompt rows (or a problem the read with the method found will name)
        args.method = "neat"
        return args.method
    args.method = "prompt"
    print("method prompt (ablation on the concept's own prompts, the run's in-distribution method; the concept "
          "vector: --method neat)", file=sys.stderr)
    return args.method


def generic_note(atlas, *, run_id: str, method: str, ablation: str | None, storage_options: dict | None = None) -> str:
    """One line naming the run's generic neurons, or ''."""
    from storage.specificity import generic_neurons

    generic = generic_neurons(atlas, run_id=run_id, method=method, ablation=ablation, storage_options=storage_options)
    if not generic.num_rows:
        return ""
    shown = ", ".join(f"L{r['layer']}#{r['neuron']}" for r in generic.slice(0, 12).to_pylist())
    more = f" and {generic.num_rows - 12} more" if generic.num_rows > 12 else ""
    return (f"{generic.num_rows} generic neurons (top 1% by |effect| for at least half of the reference and run "
            f"concepts; evidence for none of them): {shown}{more}")


def measured_set_note(atlas, *, run_id: str, concept: str, ablation: str, storage_options: dict | None = None) -> str:
    """One line on the run's measured top-k set of a prompt ranking (cluster/measured_step.py), or ''.

    The per-neuron `specificity` column divides one neuron's |effect| by at least 5% of the concept's
    largest single |effect| (usually a generic neuron's), so each carrier reads below 1; the set is
    what is specific, and this is its measurement."""
    from storage.read import run_metadata

    return measured_set_text(run_metadata(atlas, run_id, storage_options), concept=concept, ablation=ablation)


def measured_set_text(metadata: dict, *, concept: str, ablation: str) -> str:
    """`measured_set_note` from a run's metadata dict (the report holds it already)."""
    made = metadata.get("measured_choice", {}).get(concept, {}).get(ablation)
    if not made:
        return ""
    return (f"the top-{made['k']} as a set, measured by the run (penalty {made['chosen_penalty']:g}): ablated together "
            f"they lower {concept}'s gold by {-made['own_change']:.3f} nats, {made['specificity']:.1f}x the largest "
            f"change of a reference or run concept on its prompts (the per-neuron specificity column is each "
            f"neuron alone; `validate` re-measures the sets)")


def query_specific(args) -> int:
    """`neuron-atlas query` with --rank-by specific (the default)."""
    from jobs.cli import write_table

    ranked = specific_or_score(args.atlas, concept=args.concept, model=args.model, method=args.method,
                               ablation=args.ablation, run_id=args.run_id, top=args.top)
    table = ranked.table
    if args.format == "table":
        print(f"{ranked.model}, run {ranked.run_id}, concept {args.concept}, method {args.method}, {ranked.note}",
              file=sys.stderr)
        if ranked.ranking == "specific":
            note = generic_note(args.atlas, run_id=ranked.run_id, method=args.method, ablation=args.ablation)
            if note:
                print(note, file=sys.stderr)
            if args.method in PROMPT_METHODS and table.num_rows:
                measured = measured_set_note(args.atlas, run_id=ranked.run_id, concept=args.concept,
                                             ablation=table.column("ablation")[0].as_py())
                if measured:
                    print(measured, file=sys.stderr)
            table = table.select(SPECIFIC_COLUMNS)
        else:
            table = table.select(["rank", "layer", "neuron", "score", "effect", "activation", "ablation"])
    write_table(table, args.format)
    return 0
