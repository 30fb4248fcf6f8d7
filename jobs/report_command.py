"""`neuron-atlas report`: one self-contained HTML file about a concept in one run, read from the atlas
through storage/ and rendered by jobs/report.py. Prints the file's path.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from jobs.specific_query import METHOD_HELP, resolve_method


def register(sub) -> None:
    parser = sub.add_parser("report", help="an HTML report of a concept in one run: heatmap, Sankey, passports")
    parser.add_argument("--atlas", required=True)
    parser.add_argument("--concept", required=True)
    parser.add_argument("--model")
    parser.add_argument("--method", help=METHOD_HELP)
    parser.add_argument("--ablation", help="default: the run's first for the method")
    parser.add_argument("--run", "--run-id", dest="run_id", help="a specific run id instead of the latest")
    parser.add_argument("--top", type=int, default=20, help="neurons in the table and passport cards (default 20)")
    parser.add_argument("--out", help="output file (default: report-CONCEPT-RUN.html)")
    parser.add_argument("--rank-by", choices=("specific", "score"), default="specific",
                        help="the top table's ranking: specific (default, when the run holds the reference "
                             "contrast; else score) or raw score")
    parser.set_defaults(handler=cmd_report)


def read_block(dataset: pds.Dataset, where: pds.Expression) -> pa.Table:
    """Rows matching `where` with every ATLAS_SCHEMA column (statistics an older atlas lacks are null)."""
    from storage.schema import ATLAS_SCHEMA, conform_to_atlas

    columns = [name for name in ATLAS_SCHEMA.names if name in dataset.schema.names]
    return conform_to_atlas(dataset.to_table(columns=columns, filter=where))


def _first_ablation(rows: pa.Table) -> pa.Table | None:
    """The rows of one ablation (the first by name), or None when there are none."""
    if rows.num_rows == 0:
        return None
    ablation = min(rows.column("ablation").to_pylist())
    return rows.filter(pc.equal(rows.column("ablation"), ablation))


def load_report(atlas_uri: str, *, concept: str, model: str | None = None, method: str = "neat",
                ablation: str | None = None, run_id: str | None = None, top: int = 20, rank_by: str = "specific"):
    """Everything the report shows, as a jobs.report.ReportData; AtlasError for an unknown
    concept, model, method, ablation or run."""
    from jobs.report import TOP_K, ReportData
    from storage.atlas import Atlas
    from storage.errors import AtlasError
    from storage.read import run_metadata, top_neurons
    from storage.validation import read_validations

    head = top_neurons(atlas_uri, concept=concept, model=model, method=method, ablation=ablation, run_id=run_id,
                       top=1).slice(0, 1).to_pylist()[0]
    model, run_id, ablation = head["model"], head["run_id"], head["ablation"]
    dataset = Atlas.open(atlas_uri).dataset()
    run = (pds.field("model") == model) & (pds.field("run_id") == run_id)
    own = run & (pds.field("concept") == concept)
    block = read_block(dataset, own & (pds.field("method") == method) & (pds.field("ablation") == ablation))
    validations = read_validations(atlas_uri, concept=concept)
    validations = validations.filter(pc.and_(pc.equal(validations.column("run_id"), run_id),
                                             pc.equal(validations.column("model"), model)))
    try:
        metadata = run_metadata(atlas_uri, run_id)
    except AtlasError:
        metadata = {}
    specific = None
    if rank_by == "specific":
        from storage.specificity import has_specificity, specific_neurons

        if has_specificity(atlas_uri, run_id=run_id, method=method):
            try:
                specific = specific_neurons(atlas_uri, run_id=run_id, concept=concept, method=method,
                                            ablation=ablation, top=top)
            except AtlasError:  # this ablation has no reference contrast (range): the report ranks by score
                specific = None
    return ReportData(
        specific=specific,
        model=model, revision=head["model_revision"], run_id=run_id, concept=concept, method=method,
        ablation=ablation, created_at=head["created_at"], block=block,
        top_rows=read_block(dataset, run & (pds.field("rank") <= TOP_K)),
        selectivity=_first_ablation(read_block(dataset, own & (pds.field("method") == "selectivity"))),
        ranges=_first_ablation(read_block(dataset, own & (pds.field("method") == "neuronlens"))),
        validations=validations, metadata=metadata, top=top,
    )


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(..., "x"): the umask's permissions
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.cli import UsageError
    from jobs.report import render_report

    if args.top < 1:
        raise UsageError(f"--top {args.top}: expected a positive number of neurons")
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UsageError(f"--out {args.out}: expected a file path in an existing directory")
    resolve_method(args)
    data = load_report(args.atlas, concept=args.concept, model=args.model, method=args.method,
                       ablation=args.ablation, run_id=args.run_id, top=args.top, rank_by=args.rank_by)
    print(f"top table: {'the specific ranking' if data.specific is not None else 'ranked by score'}", file=sys.stderr)
    path = out or Path(f"report-{data.concept}-{data.run_id}.html")
    write_atomic(path, render_report(data))
    print(path)
    return 0
