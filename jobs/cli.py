"""`neuron-atlas`: the command line. Thin: parse flags, load the config, call cluster/ or storage/.

Data goes to stdout (tables, JSON, CSV); progress and messages go to stderr. Exit status: 0 ok,
1 a run failed, 2 bad input (config, concept file, model, query), 130 interrupted.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

# Quiet, offline library defaults for a command-line tool: no hub calls, no progress bars.
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                      ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                      ("RAY_DEDUP_LOGS", "0")):
    os.environ.setdefault(_name, _value)

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BUILTIN_CONCEPTS = REPO_CONFIGS / "concepts" / "builtin.yaml"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """Bad input on the command line; printed without a traceback, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from attribution.errors import AttributionError
    from cluster.config import ConfigError
    from cluster.submit import SubmitError
    from storage.errors import AtlasError

    return (AttributionError, ConfigError, AtlasError, SubmitError, UsageError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuron-atlas",
        description="Score every MLP neuron of a language model for concepts (exact NEAT on Ray) into a "
                    "versioned Delta Lake neuron atlas, and query it.",
        epilog="Start with: neuron-atlas run configs/demo.yaml; then neuron-atlas query --atlas ./atlas --concept royalty")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="score every neuron of the configured layers and commit one atlas version")
    run.add_argument("config", help="job config YAML (see configs/demo.yaml)")
    run.add_argument("--model", help="alias, local HF directory, or cached hub id")
    run.add_argument("--concepts", help="concept file (replaces the config's concepts)")
    run.add_argument("--layers", help="comma-separated layers, e.g. 0,5,29, or 'all'")
    run.add_argument("--actors", type=int, help="number of actors (model replicas)")
    run.add_argument("--atlas", help="atlas directory or fsspec URL")
    run.add_argument("--run-id", help="run id (slug); re-using an unfinished run's id resumes it")
    run.add_argument("--method", dest="methods", action="append",
                     help="scoring method (repeatable): neat | atp | neurgrad | neg | neuronlens | selectivity | ig")
    run.add_argument("--ablation", action="append", help="zero | mean | range (repeatable; for neat and atp)")
    run.add_argument("--device", help="auto | cpu | cuda")
    run.add_argument("--dtype", help="float32 | bf16")
    run.add_argument("--dry-run", action="store_true", help="print the resolved plan and run nothing")

    submit = sub.add_parser("submit", help="submit the run to a Ray cluster (Ray Jobs API); prints the submission id")
    submit.add_argument("config", help="job config YAML; its concept file travels with the job")
    submit.add_argument("--address", help="Ray Jobs API, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    submit.add_argument("--run-id", help="run id = submission id (slug); a run id already submitted is refused")
    submit.add_argument("--wait", action="store_true", help="follow the job's logs; exit 1 if it does not succeed")
    submit.add_argument("--resume", action="store_true",
                        help="the run's job FAILED or was STOPPED: submit it again (as ID-resume-N) to compute "
                             "only its unfinished shards")
    for flag in ("--model", "--concepts", "--layers", "--atlas", "--device", "--dtype"):
        submit.add_argument(flag, help=f"as for run ({flag})")
    submit.add_argument("--actors", type=int, help="number of actors (model replicas)")
    submit.add_argument("--method", dest="methods", action="append", help="as for run (repeatable)")
    submit.add_argument("--ablation", action="append", help="as for run (repeatable)")
    status = sub.add_parser("status", help="status of a submitted run (Ray Jobs API)")
    status.add_argument("submission_id", metavar="ID", help="the run id printed by submit")
    status.add_argument("--address", help="Ray Jobs API, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    status.add_argument("--format", choices=("table", "json"), default="table")
    logs = sub.add_parser("logs", help="logs of a submitted run (Ray Jobs API)")
    logs.add_argument("submission_id", metavar="ID", help="the run id printed by submit")
    logs.add_argument("--address", help="Ray Jobs API, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")

    query = sub.add_parser("query", help="top neurons of a concept from the latest committed run")
    query.add_argument("--atlas", required=True)
    query.add_argument("--concept", required=True)
    query.add_argument("--model")
    query.add_argument("--method", default="neat")
    query.add_argument("--ablation", help="zero | mean | range | none (default: all in the run)")
    query.add_argument("--run", dest="run_id", help="a specific run id instead of the latest")
    query.add_argument("--top", type=int, default=20)
    query.add_argument("--rank-by", choices=("specific", "score", "contrastive"), default="specific",
                       help="specific (default when the run holds the reference contrast): neurons that move the "
                            "concept far more than other concepts; score: raw; contrastive: score minus the "
                            "neuron's best score for another concept of the run")
    query.add_argument("--format", choices=("table", "json", "csv"), default="table")

    sql = sub.add_parser("sql", help="read-only SQL over the views neurons, latest, runs (DuckDB)")
    sql.add_argument("--atlas", required=True)
    sql.add_argument("query")
    sql.add_argument("--format", choices=("table", "json", "csv"), default="table")

    runs = sub.add_parser("runs", help="committed runs of an atlas, newest first")
    runs.add_argument("--atlas", required=True)
    runs.add_argument("--format", choices=("table", "json", "csv"), default="table")

    listing = sub.add_parser("list", help="built-in model aliases or concepts")
    listing.add_argument("what", choices=("models", "concepts"))
    from jobs.atlas_commands import register  # atlas, neuron, diff; --as-of on query and sql

    for name, handler in register(sub).items():
        sub.choices[name].set_defaults(handler=handler)
    from jobs.validate_command import register as register_validate  # validate

    register_validate(sub)
    from jobs.report_command import register as register_report  # report
    register_report(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "query": cmd_query, "sql": cmd_sql, "runs": cmd_runs, "list": cmd_list,
                "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs}
    try:
        return (getattr(args, "handler", None) or handlers[args.command])(args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was committed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as err:
        print(f"neuron-atlas {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def cmd_run(args: argparse.Namespace) -> int:
    from cluster.config import apply_overrides, load_job_config
    from cluster.driver import RunError, describe_plan, run_job
    from cluster.plan import resolve_job

    config = apply_overrides(
        load_job_config(args.config), model=args.model, concepts=args.concepts, layers=args.layers,
        actors=args.actors, atlas=args.atlas, run_id=args.run_id, methods=args.methods,
        ablation=args.ablation, device=args.device, dtype=args.dtype,
    )
    plan = resolve_job(config)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(describe_plan(plan))
        return 0
    try:
        summary = run_job(plan)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run {plan.run_id} was not committed; staged shards are kept, "
              f"re-run with --run-id {plan.run_id} to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunError as err:
        print(f"neuron-atlas run: failed: {err}; the atlas is unchanged", file=sys.stderr)
        return EXIT_FAILED
    print(f"committed run {summary.run_id} as atlas version {summary.version}: {summary.rows:,} rows, "
          f"{summary.seconds:.1f} s, {summary.neuron_scores_per_second:,.0f} neuron scores/s, "
          f"atlas {summary.atlas}", file=sys.stderr)
    print(json.dumps(summary.as_dict()))
    return 0


def _jobs_address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise UsageError("--address http://HEAD:8265 (the Ray Jobs API of the cluster's head) is required")
    return address


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.config import apply_overrides, load_job_config
    from cluster.plan import check_before_submit
    from cluster.submit import follow_logs, submit_job, wait_for_job, withheld_options

    address = _jobs_address(args)
    config = apply_overrides(
        load_job_config(args.config), model=args.model, concepts=args.concepts, layers=args.layers,
        actors=args.actors, atlas=args.atlas, run_id=args.run_id, methods=args.methods,
        ablation=args.ablation, device=args.device, dtype=args.dtype,
    )
    if args.resume and not config.run_id:
        raise UsageError("--resume needs the --run-id of the run to resume")
    note = check_before_submit(config)  # a bad layer or concept file exits 2 here, not as a FAILED job
    if note:
        print(f"note: {note}", file=sys.stderr)
    job = submit_job(config, address=address, resume=args.resume)
    print(job.submission_id, flush=True)
    if withheld_options(config):
        print(f"warning: storage options {', '.join(withheld_options(config))} are credentials and were not sent "
              f"with the job: the cluster's nodes need their own (the AWS chain)", file=sys.stderr)
    what = f"run {job.run_id} as job {job.submission_id}" if job.submission_id != job.run_id else f"run {job.run_id}"
    print(f"submitted {what} to {address}: {job.entrypoint}\n"
          f"  neuron-atlas status {job.submission_id} --address {address}\n"
          f"  neuron-atlas logs {job.submission_id} --address {address} --follow", file=sys.stderr, flush=True)
    if not args.wait:
        return 0
    try:
        follow_logs(address, job.submission_id, sys.stderr)
        state = wait_for_job(address, job.submission_id)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job.submission_id} goes on on the cluster", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"job {job.submission_id} {state.status}: {state.message}", file=sys.stderr)
    return 0 if state.status == "SUCCEEDED" else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.submit import job_state

    state = job_state(_jobs_address(args), args.submission_id)
    if args.format == "json":
        print(json.dumps(state.as_dict()))
        return 0
    stamp = lambda t: "" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    for key, value in (("run", state.submission_id), ("status", state.status), ("message", state.message),
                       ("started", stamp(state.start_time)), ("ended", stamp(state.end_time)),
                       ("entrypoint", state.entrypoint)):
        print(f"{key:<11}{value}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from cluster.submit import follow_logs, job_logs

    address = _jobs_address(args)
    if args.follow:
        follow_logs(address, args.submission_id, sys.stdout)
    else:
        sys.stdout.write(job_logs(address, args.submission_id))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from storage.read import top_neurons

    if args.top < 1:
        raise UsageError(f"--top {args.top}: expected a positive number of neurons")
    if args.rank_by == "contrastive":
        return _query_contrastive(args)
    if args.rank_by == "specific" and args.as_of is None:  # an old version of the atlas: raw scores
        from jobs.specific_query import query_specific

        return query_specific(args)
    table = top_neurons(args.atlas, concept=args.concept, model=args.model, method=args.method,
                        ablation=args.ablation, run_id=args.run_id, top=args.top, as_of=args.as_of)
    if args.format == "table" and table.num_rows:
        # A person reads the ranking; what is the same on every row goes into one line on stderr.
        first = table.slice(0, 1).to_pylist()[0]
        print(f"{first['model']} ({first['model_revision']}), run {first['run_id']}, concept {first['concept']}, "
              f"method {first['method']}", file=sys.stderr)
        table = table.select(["rank", "layer", "neuron", "score", "effect", "activation", "ablation"])
    write_table(table, args.format)
    return 0


def _query_contrastive(args: argparse.Namespace) -> int:
    from storage.contrast import contrastive_neurons

    if args.as_of is not None:
        raise UsageError("--rank-by contrastive reads the latest atlas; use --run instead of --as-of")
    table, generic, info = contrastive_neurons(args.atlas, concept=args.concept, model=args.model,
                                               method=args.method, ablation=args.ablation, run_id=args.run_id,
                                               top=args.top)
    if args.format == "table":
        print(f"{info['model']}, run {info['run_id']}, concept {args.concept}, method {info['method']}, "
              f"ranked by score minus the best other concept's score", file=sys.stderr)
        if generic.num_rows:
            shown = ", ".join(f"L{r['layer']}#{r['neuron']}" for r in generic.slice(0, 10).to_pylist())
            print(f"{generic.num_rows} neurons are in the top-100 of every concept of this run (generic, "
                  f"demoted): {shown}", file=sys.stderr)
        table = table.select(["contrastive_rank", "layer", "neuron", "contrastive_score", "score", "rank",
                              "closest_concept", "closest_score", "ablation"])
    write_table(table, args.format)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from storage.read import sql_query

    write_table(sql_query(args.atlas, args.query, run_id=args.run_id, as_of=args.as_of), args.format)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from storage.read import list_runs

    table = list_runs(args.atlas)
    if args.format == "table" and "metadata_json" in table.column_names:
        table = table.drop_columns(["metadata_json"])
    write_table(table, args.format)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "models":
        from attribution.models import ALIASES

        for name, alias in ALIASES.items():
            print(f"{name:<16} {alias.description}")
        print("(or a local Hugging Face directory, or a hub id already in the local cache)", file=sys.stderr)
        return 0
    from attribution.concepts import load_concept_file

    for concept in load_concept_file(BUILTIN_CONCEPTS):
        print(f"{concept.name:<20} {len(concept.examples):>3} examples  targets: {', '.join(concept.targets)}")
    print(f"(from {BUILTIN_CONCEPTS})", file=sys.stderr)
    return 0


def _jsonable(value):
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def write_table(table, fmt: str, stream=None) -> None:
    """An Arrow table to stdout as an aligned table, a JSON array of row objects, or CSV."""
    stream = stream or sys.stdout
    rows = table.to_pylist()
    if fmt == "json":
        json.dump([{k: _jsonable(v) for k, v in row.items()} for row in rows], stream)
        stream.write("\n")
        return
    if fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=table.column_names, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _jsonable(v) for k, v in row.items()} for row in rows)
        return
    cells = [[_format_cell(row[name]) for name in table.column_names] for row in rows]
    widths = [max([len(name)] + [len(r[i]) for r in cells]) for i, name in enumerate(table.column_names)]
    out = io.StringIO()
    out.write("  ".join(n.ljust(w) for n, w in zip(table.column_names, widths)).rstrip() + "\n")
    for r in cells:
        out.write("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    stream.write(out.getvalue())
    if not rows:
        print("(no rows)", file=sys.stderr)


def _format_cell(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.6g}"
    if hasattr(value, "isoformat"):
        return value.isoformat(timespec="seconds")
    return "" if value is None else str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def entry() -> None:
    """The console command: exits without interpreter teardown, where pyarrow and deltalake threads
    can abort the process (exit status 134) after the work is done and printed."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader (head, less) stopped early: not an error of ours
        code = 0
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
