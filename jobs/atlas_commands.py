"""`neuron-atlas atlas history|vacuum|optimize`, `neuron`, `diff`, and the `--as-of` / `--run` flags of `query`
and `sql`. Storage options come from the standard AWS environment and profile chain (AWS_ENDPOINT_URL,
AWS_REGION, AWS_PROFILE, ...): never from flags, which other users of the machine can read.
"""
from __future__ import annotations

import argparse
import json
import sys

AS_OF_HELP = "read the atlas as of a version number or an ISO 8601 time (e.g. 2026-11-22T07:00:00Z)"


def register(sub) -> dict:
    """Add the atlas commands to the `neuron-atlas` subparsers, and the time-travel flags to the
    existing `query` and `sql` parsers. Returns command name -> handler."""
    formats = ("table", "json", "csv")
    if "query" in sub.choices:
        sub.choices["query"].add_argument("--as-of", help=AS_OF_HELP)
    if "sql" in sub.choices:
        sub.choices["sql"].add_argument("--run", dest="run_id", help="views show only this run's rows")
        sub.choices["sql"].add_argument("--as-of", help=AS_OF_HELP)

    atlas = sub.add_parser("atlas", help="atlas versions and clean-up")
    atlas_sub = atlas.add_subparsers(dest="atlas_command", required=True)
    history = atlas_sub.add_parser("history", help="versions, newest first: run, model, revision, concepts, rows, time")
    history.add_argument("--atlas", required=True)
    history.add_argument("--limit", type=int, help="only the newest N versions")
    history.add_argument("--format", choices=formats, default="table")
    vacuum = atlas_sub.add_parser("vacuum", help="remove files no version references (crashed writers, stale staging)")
    vacuum.add_argument("--atlas", required=True)
    vacuum.add_argument("--retention-hours", type=int, default=168,
                        help="only files older than this (default 168); must exceed the longest job")
    vacuum.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    vacuum.add_argument("--format", choices=formats[:2], default="table")
    optimize = atlas_sub.add_parser("optimize", help="compact small files into larger ones and write a checkpoint "
                                                     "(rows unchanged; keeps reads fast as runs accumulate)")
    optimize.add_argument("--atlas", required=True)
    optimize.add_argument("--format", choices=formats[:2], default="table")

    neuron = sub.add_parser("neuron", help="a neuron's passport: every concept it ranks in the top k for")
    neuron.add_argument("--atlas", required=True)
    neuron.add_argument("--layer", type=int, required=True)
    neuron.add_argument("--neuron", type=int, required=True)
    neuron.add_argument("--model")
    neuron.add_argument("--top", "--k", dest="top", type=int, default=100,
                        help="top-k cut: concepts for which the neuron ranks in the top this many")
    neuron.add_argument("--run", dest="run_id", help="a specific run instead of the latest per concept")
    neuron.add_argument("--as-of", help=AS_OF_HELP)
    neuron.add_argument("--format", choices=formats, default="table")

    diff = sub.add_parser("diff", help="how a concept's top-k and ranking moved between two runs")
    diff.add_argument("--atlas", required=True)
    diff.add_argument("--concept", required=True)
    diff.add_argument("--run-a", help="default: the run --run-b's stored drift compares with (neuron-atlas drift)")
    diff.add_argument("--run-b", required=True)
    diff.add_argument("--top", "--k", dest="top", type=int, default=100, help="top-k cut")
    diff.add_argument("--method", default="neat")
    diff.add_argument("--ablation", help="needed when the runs share several")
    diff.add_argument("--format", choices=formats, default="table")
    return {"atlas": cmd_atlas, "neuron": cmd_neuron, "diff": cmd_diff}


def _usage(message: str) -> Exception:
    from jobs.cli import UsageError

    return UsageError(message)


def cmd_atlas(args: argparse.Namespace) -> int:
    from jobs.cli import write_table

    if args.atlas_command == "history":
        from storage.history import atlas_history

        if args.limit is not None and args.limit < 1:
            raise _usage(f"--limit {args.limit}: expected a positive number of versions")
        write_table(atlas_history(args.atlas, limit=args.limit), args.format)
        return 0
    if args.atlas_command == "optimize":
        from storage.history import optimize_atlas

        report = optimize_atlas(args.atlas)
        if args.format == "json":
            print(json.dumps(report.as_dict()))
            return 0
        for name, done in (("neurons", report.neurons), ("runs", report.runs)):
            print(f"{name}: {done['files_removed']} files compacted into {done['files_added']}, checkpoint at "
                  f"version {done['checkpoint_version']}")
        return 0
    from storage.history import vacuum_atlas

    if args.retention_hours < 0:
        raise _usage(f"--retention-hours {args.retention_hours}: expected a number of hours >= 0")
    if args.retention_hours < 24 and not args.dry_run:
        print(f"warning: retention {args.retention_hours} h: files of a job still writing to this atlas "
              "would be removed as orphans", file=sys.stderr)
    report = vacuum_atlas(args.atlas, retention_hours=args.retention_hours, dry_run=args.dry_run)
    if args.format == "json":
        print(json.dumps(report.as_dict()))
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for name, files in (("neurons", report.neurons_files), ("runs", report.runs_files)):
        for path in files:
            print(f"{name}/{path}")
    for run_id in report.staging_runs:
        print(f"_staging/{run_id}/")
    files = len(report.neurons_files) + len(report.runs_files)
    print(f"{verb} {files} unreferenced data file{'s' if files != 1 else ''} and "
          f"{len(report.staging_runs)} staging director{'ies' if len(report.staging_runs) != 1 else 'y'} "
          f"older than {report.retention_hours} h from {report.atlas}", file=sys.stderr)
    return 0


def cmd_neuron(args: argparse.Namespace) -> int:
    from jobs.cli import write_table
    from storage.atlas import Atlas

    if args.top < 1:
        raise _usage(f"--top {args.top}: expected a positive number of neurons")
    atlas = Atlas.open(args.atlas)
    table = atlas.passport(args.layer, args.neuron, model=args.model, k=args.top, run=args.run_id, as_of=args.as_of)
    if table.num_rows == 0:
        _check_neuron_exists(args)
    if args.format == "table":
        if table.num_rows:
            first = table.slice(0, 1).to_pylist()[0]
            print(f"{first['model']} layer {args.layer} neuron {args.neuron}: top-{args.top} in {table.num_rows} "
                  f"(concept, method, ablation)", file=sys.stderr)
        table = table.select(["concept", "method", "ablation", "rank", "score", "effect", "activation", "run_id"])
    write_table(table, args.format)
    return 0


def _check_neuron_exists(args: argparse.Namespace) -> None:
    """An empty passport of a neuron the model does not have is an error (exit 2), not "(no rows)":
    the bounds come from the runs' recorded model shape (n_layers, d_mlp)."""
    from storage.read import list_runs

    runs = list_runs(args.atlas, as_of=args.as_of)
    shapes = set()
    for row in runs.select(["run_id", "metadata_json"]).to_pylist():
        if args.run_id is not None and row["run_id"] != args.run_id:
            continue
        try:
            meta = json.loads(row["metadata_json"] or "{}")
        except ValueError:
            continue
        model = meta.get("model") or {}
        if args.model is not None and args.model not in (model.get("name"), meta.get("model_name")):
            continue
        if isinstance(model, dict) and "n_layers" in model and "d_mlp" in model:
            shapes.add((model.get("name", "?"), int(model["n_layers"]), int(model["d_mlp"])))
    for name, n_layers, d_mlp in sorted(shapes):
        if args.layer >= n_layers or args.neuron >= d_mlp:
            raise _usage(f"layer {args.layer} neuron {args.neuron} is not a neuron of model {name}: "
                         f"layers 0..{n_layers - 1}, neurons 0..{d_mlp - 1}")


def cmd_diff(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from jobs.cli import write_table
    from storage.atlas import Atlas

    if args.top < 1:
        raise _usage(f"--top {args.top}: expected a positive number of neurons")
    from storage.drift import stored_drift, summary_line

    stored = stored_drift(args.atlas, args.run_b, args.concept, method=args.method, ablation=args.ablation,
                          previous=args.run_a)
    if args.run_a is None:
        if stored is None:
            raise _usage(f"--run-a is needed: run {args.run_b!r} has no stored drift for concept {args.concept!r}")
        args.run_a = stored["previous_run_id"]
    if stored is not None and args.format == "table":
        print(summary_line(stored), file=sys.stderr)  # as recorded when the run committed
    diff = Atlas.open(args.atlas).diff(args.run_a, args.run_b, args.concept, k=args.top, method=args.method,
                                       ablation=args.ablation)
    if args.format == "json":
        print(json.dumps(diff.as_dict()))
        return 0
    print(diff.summary(), file=sys.stderr)
    changes = [t.append_column("change", pa.repeat(pa.scalar(word), t.num_rows))
               for t, word in ((diff.entered, "entered"), (diff.left, "left"))]
    write_table(pa.concat_tables(changes), args.format)
    return 0
