"""`neuron-atlas`: the command line. Thin: parse flags, load the config, call cluster/ or storage/.

Data goes to stdout (tables, JSON, CSV); progress and messages go to stderr. Exit status: 0 ok,
1 a run failed, 2 bad input (config, concept file, model, query), 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time

from configs import builtin_concepts
from jobs import specific_query

# Quiet, offline library defaults for a command-line tool: no hub calls, no progress bars.
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                      ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                      ("RAY_DEDUP_LOGS", "0"),
                      # delta-rs logs multi-line WARN records (IMDS probes) to stderr: errors only.
                      ("RUST_LOG", "error")):
    os.environ.setdefault(_name, _value)

BUILTIN_CONCEPTS = builtin_concepts()  # package data: found in a wheel install too
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
EXIT_RETRY = 75  # EX_TEMPFAIL: the commit lost its races against concurrent writers; run it again
EXIT_TIMEOUT = 124  # as timeout(1): `sql` stopped at its --timeout
EXIT_TERMINATED = 143  # 128 + SIGTERM
SQL_TIMEOUT_S, SQL_MEMORY_LIMIT, SQL_TABLE_ROWS = 60.0, "2GB", 1000  # `sql` defaults (see storage.read)


class UsageError(Exception):
    """Bad input on the command line; printed without a traceback, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from attribution.errors import AttributionError
    from cluster.config import ConfigError
    from cluster.submit import SubmitError
    from storage.errors import AtlasError

    return (AttributionError, ConfigError, AtlasError, SubmitError, UsageError)


def _retry_errors() -> tuple[type[BaseException], ...]:
    from storage.errors import CommitRaceError

    return (CommitRaceError,)


# Commands that only read an atlas: a path with no atlas there is an error, not an empty atlas.
READ_COMMANDS = {"sql", "runs", "query", "neuron", "diff", "validate", "report", ("atlas", "history")}


def check_atlas_argument(args: argparse.Namespace) -> None:
    """`--atlas` names an atlas a command can use: never a file; for read commands, one that exists."""
    from storage.location import allow_plain_http
    from storage.redaction import redact

    endpoint = allow_plain_http()
    if endpoint:
        print(f"note: S3 endpoint {redact(endpoint)} is plain HTTP (no TLS): allowed for this command "
              "(AWS_ALLOW_HTTP=true); set AWS_ALLOW_HTTP yourself to silence this note", file=sys.stderr)
    atlas = getattr(args, "atlas", None)
    if not atlas:
        return
    from storage.preflight import check_atlas_exists, check_not_a_file

    check_not_a_file(atlas)
    key = (args.command, getattr(args, "atlas_command", None)) if args.command == "atlas" else args.command
    if key in READ_COMMANDS:
        check_atlas_exists(atlas)


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
    run.add_argument("--run-id", "--run", dest="run_id",
                     help="run id (slug); re-using an unfinished run's id resumes it (default: time + config hash)")
    run.add_argument("--method", dest="methods", action="append",
                     help="scoring method (repeatable): neat | atp | prompt | neurgrad | neg | neuronlens | selectivity | ig")
    run.add_argument("--ablation", action="append", help="zero | mean | range (repeatable; for neat, atp and prompt; prompt takes zero and mean)")
    run.add_argument("--device", help="auto | cpu | cuda")
    run.add_argument("--dtype", help="float32 | bf16")
    run.add_argument("--dry-run", action="store_true", help="print the resolved plan and run nothing")

    submit = sub.add_parser("submit", help="submit the run to a Ray cluster (Ray Jobs API); prints the submission id")
    submit.add_argument("config", help="job config YAML; its concept file travels with the job")
    submit.add_argument("--address", help="Ray Jobs API, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    submit.add_argument("--run-id", "--run", dest="run_id", help="run id = submission id (slug); a run id already submitted is refused")
    submit.add_argument("--wait", action="store_true", help="follow the job's logs; exit 1 if it does not succeed")
    submit.add_argument("--resume", action="store_true",
                        help="the run's job FAILED or was STOPPED: submit it again (as ID-resume-N) to compute "
                             "only its unfinished shards")
    for flag in ("--model", "--concepts", "--layers", "--atlas", "--device", "--dtype"):
        submit.add_argument(flag, help=f"as for run ({flag})")
    submit.add_argument("--actors", type=int, help="number of actors (model replicas)")
    submit.add_argument("--method", dest="methods", action="append", help="as for run (repeatable)")
    submit.add_argument("--ablation", action="append", help="as for run (repeatable)")
    submit.add_argument("--entrypoint-num-cpus", type=float,
                        help="CPUs reserved for the job's driver (cluster.entrypoint_num_cpus; > 0 can place it off the head)")
    submit.add_argument("--entrypoint-memory-gb", type=float,
                        help="memory reserved for the job's driver, decimal GB (cluster.entrypoint_memory_gb)")
    submit.add_argument("--entrypoint-resource", action="append", metavar="NAME=AMOUNT",
                        help="a custom resource the driver's node must have (repeatable; cluster.entrypoint_resources)")
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
    query.add_argument("--method", help=specific_query.METHOD_HELP)
    query.add_argument("--ablation", help="zero | mean | range | none (default: all in the run)")
    query.add_argument("--run", "--run-id", dest="run_id", help="a specific run id instead of the latest")
    query.add_argument("--top", type=int, default=20)
    query.add_argument("--rank-by", choices=("specific", "score", "contrastive"),
                       help="specific (default when the run holds the reference contrast): neurons that move the "
                            "concept far more than other concepts; score: raw; contrastive: score minus the "
                            "neuron's best score for another concept of the run")
    query.add_argument("--sign", choices=("carry", "suppress", "both"),
                       help="carry: neurons whose ablation lowers the concept's targets; suppress: raises them; both: "
                            "by |effect| (default: both; the specific ranking of prompt methods is carry by design)")
    query.add_argument("--format", choices=("table", "json", "csv"), default="table")

    sql = sub.add_parser("sql", help="read-only SQL over the views neurons, latest, runs (DuckDB)")
    sql.add_argument("--atlas", required=True, help="atlas directory or fsspec URL")
    sql.add_argument("query", nargs="?", help="one SELECT (or WITH ... SELECT, PIVOT); '-' reads it from stdin")
    sql.add_argument("-f", "--file", help="read the query from this file ('-': stdin)")
    sql.add_argument("--format", choices=("table", "json", "csv"), default="table",
                     help="csv and json stream the whole result in constant memory")
    sql.add_argument("--timeout", type=float, default=SQL_TIMEOUT_S,
                     help=f"seconds the query may run, streaming included; exit {EXIT_TIMEOUT} when it is stopped "
                          "(0: no limit)")
    sql.add_argument("--memory-limit", default=SQL_MEMORY_LIMIT, help="DuckDB's memory limit, e.g. 500MB, 4GB")
    sql.add_argument("--limit", type=int,
                     help=f"at most this many rows (default: {SQL_TABLE_ROWS} for --format table, all for csv/json)")
    sql.add_argument("--no-limit", action="store_true", help="print every row also in the table format")

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
    from jobs.schedule_command import register as register_schedule  # schedule, drift

    register_schedule(sub)
    parser.add_argument("--version", action="version", version=f"neuron-atlas {package_version()}")
    _complete_help(parser)
    return parser


# Help for flags registered without any, by destination; every flag's help then shows its default.
_DEFAULT_HELP = {
    "atlas": "atlas directory or fsspec URL (s3://bucket/prefix)",
    "concept": "concept name (a slug, as in the concept file)",
    "model": "model name in the atlas (needed only when several models hold the concept)",
    "method": "scoring method whose rows to read: neat | atp | prompt | prompt-atp | neurgrad | neg | neuronlens | selectivity | ig",
    "format": "output format: table for people; json or csv for programs",
    "layer": "layer number (0-based)",
    "neuron": "neuron number within the layer (0-based)",
    "run_a": "the earlier run id",
    "run_b": "the later run id",
    "limit": "at most this many rows",
    "seed": "random seed of the draws",
    "device": "auto | cpu | cuda",
    "top": "number of neurons",
}


def _complete_help(parser: argparse.ArgumentParser) -> None:
    """Every flag of every subcommand gets a help text, and the help shows its default when it has one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _complete_help(child)
            continue
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if not action.help:
            action.help = _DEFAULT_HELP.get(action.dest, action.dest.replace("_", " "))
        default = action.default
        if default not in (None, False, argparse.SUPPRESS) and "default" not in action.help:
            action.help += " (default: %(default)s)"


def package_version() -> str:
    """The installed package's version, or pyproject.toml's for a source checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neuron-atlas")
    except PackageNotFoundError:
        from pathlib import Path

        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
        return found.group(1) if found else "unknown"


ERROR_CHARS = 2000  # an error message is one line of at most this many characters


def say_error(command: str, err: object, what: str = "error") -> None:
    """One line on stderr: the message flattened, bounded and with credentials redacted."""
    from storage.read import excerpt
    from storage.redaction import redact

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(err))  # delta-rs colours some messages
    print(f"neuron-atlas {command}: {what}: {excerpt(redact(text), ERROR_CHARS)}", file=sys.stderr, flush=True)


class Terminated(BaseException):
    """SIGTERM arrived (our handler, installed before Ray's and again after ray.init)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "query": cmd_query, "sql": cmd_sql, "runs": cmd_runs, "list": cmd_list,
                "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs}
    import signal
    import threading

    from storage.read import SqlTimeout

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        check_atlas_argument(args)
        return (getattr(args, "handler", None) or handlers[args.command])(args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was committed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("\nterminated (SIGTERM): nothing was committed", file=sys.stderr)
        return EXIT_TERMINATED
    except SystemExit as e:  # Ray's own SIGTERM handler (installed by ray.init) exits with the signal number
        if e.code == signal.SIGTERM:
            print("\nterminated (SIGTERM): nothing was committed", file=sys.stderr)
            return EXIT_TERMINATED
        raise
    except SqlTimeout as err:
        say_error(args.command, err)
        return EXIT_TIMEOUT
    except _retry_errors() as err:
        say_error(args.command, err, "retry")
        return EXIT_RETRY
    except _user_errors() as err:
        say_error(args.command, err)
        return EXIT_USAGE
    except UnicodeDecodeError as err:  # a binary file where text was expected, from any reader
        say_error(args.command, f"a file is not UTF-8 text ({err.reason} at byte {err.start})")
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
    from storage.preflight import check_atlas_writable

    if not args.dry_run:  # a dry run writes nothing: plan a cluster job from anywhere
        check_atlas_writable(config.atlas, config.storage_options)  # before any model is read or Ray started
    plan = resolve_job(config, plan_only=args.dry_run)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(describe_plan(plan))
        return 0
    import ray.exceptions

    try:
        with _stdout_to_stderr():  # Ray's "(raylet) ..." lines and actor tracebacks are not data
            summary = run_job(plan)
    except (KeyboardInterrupt, Terminated) as stop:
        what = "interrupted" if isinstance(stop, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"\n{what}: run {plan.run_id} was not committed; staged shards are kept, "
              f"re-run with --run-id {plan.run_id} to resume", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(stop, KeyboardInterrupt) else EXIT_TERMINATED
    except RunError as err:
        say_error("run", f"{err}; the atlas is unchanged", "failed")
        return EXIT_FAILED
    except ray.exceptions.RayError as err:  # an actor died (a model that fails to load, out of memory)
        say_error("run", f"{type(err).__name__}: {_last_line(err)}; the atlas is unchanged", "failed")
        return EXIT_FAILED
    except OSError as err:  # the atlas's storage went away during the run (delta-rs, s3fs)
        say_error("run", f"{type(err).__name__}: {err}; staged shards are kept, re-run with --run-id "
                         f"{plan.run_id} to resume", "failed")
        return EXIT_FAILED
    except _user_errors():
        raise
    except Exception as err:  # e.g. Ray's "node timed out during startup": one line, not a traceback
        if os.environ.get("NEURON_ATLAS_TRACEBACK"):
            raise
        say_error("run", f"{type(err).__name__}: {_last_line(err)}; staged shards are kept, re-run with --run-id "
                         f"{plan.run_id} to resume (NEURON_ATLAS_TRACEBACK=1 shows the traceback)", "failed")
        return EXIT_FAILED
    print(f"committed run {summary.run_id} as atlas version {summary.version}: {summary.rows:,} rows, "
          f"{summary.seconds:.1f} s, {summary.neuron_scores_per_second:,.0f} neuron scores/s, "
          f"atlas {summary.atlas}", file=sys.stderr)
    print(json.dumps(summary.as_dict()))
    return 0


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 points at stderr inside the block (for this process and the Ray processes it
    starts, which inherit it); sys.stdout and fd 1 are restored afterwards for the data."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (a closed stdout): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _jobs_address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise UsageError("--address http://HEAD:8265 (the Ray Jobs API of the cluster's head) is required")
    return address


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.config import apply_overrides, load_job_config
    from cluster.plan import check_before_submit
    from cluster.submit import (claim_submission, follow_logs, submit_job, wait_for_job, with_entrypoint,
                                withheld_options)

    address = _jobs_address(args)
    config = apply_overrides(
        load_job_config(args.config), model=args.model, concepts=args.concepts, layers=args.layers,
        actors=args.actors, atlas=args.atlas, run_id=args.run_id, methods=args.methods,
        ablation=args.ablation, device=args.device, dtype=args.dtype,
    )
    config = with_entrypoint(config, num_cpus=args.entrypoint_num_cpus, memory_gb=args.entrypoint_memory_gb,
                             resources=args.entrypoint_resource)
    if args.resume and not config.run_id:
        raise UsageError("--resume needs the --run-id of the run to resume")
    # The run id first (a used one is refused in a few HTTP calls), then the config: a bad layer or
    # concept file exits 2 here, not as a FAILED job.
    slot = claim_submission(config, address=address, resume=args.resume, progress=sys.stderr)
    note = check_before_submit(config)
    if note:
        print(f"note: {note}", file=sys.stderr)
    job = submit_job(config, slot, address=address, progress=sys.stderr)
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
    specific_query.resolve_method(args)
    rank_by = _query_ranking(args)
    if rank_by == "contrastive":
        return _query_contrastive(args)
    if rank_by == "specific" and args.as_of is None:  # an old version of the atlas: raw scores
        from jobs.specific_query import query_specific

        return query_specific(args)

    def fetch(count: int):
        return top_neurons(args.atlas, concept=args.concept, model=args.model, method=args.method,
                           ablation=args.ablation, run_id=args.run_id, top=count, as_of=args.as_of)

    table = fetch(args.top) if args.sign in (None, "both") else signed_top(fetch, args.sign, args.top)
    if args.format == "table" and table.num_rows:
        # A person reads the ranking; what is the same on every row goes into one line on stderr.
        from storage.read import describe_sources

        first = table.slice(0, 1).to_pylist()[0]
        sign = {"carry": ", neurons whose ablation lowers the targets (effect < 0)",
                "suppress": ", neurons whose ablation raises the targets (effect > 0)"}.get(args.sign, "")
        print(f"{first['model']} ({first['model_revision']}), {describe_sources(table)}, concept {first['concept']}, "
              f"method {first['method']}{sign}", file=sys.stderr)
        columns = ["rank", "layer", "neuron", "score", "effect", "activation", "ablation"]
        if len(set(table.column("run_id").to_pylist())) > 1:  # rows of several runs: say which row is whose
            columns.append("run_id")
        table = table.select(columns)
    write_table(table, args.format)
    return 0


def _query_ranking(args: argparse.Namespace) -> str:
    """--rank-by, defaulting to specific. The specific ranking has a sign of its own (a prompt method's
    takes neurons that carry the concept, the others' any sign): another --sign ranks by raw score."""
    if args.sign is None:
        return args.rank_by or "specific"
    from cluster.config import PROMPT_METHODS

    specific_sign = "carry" if args.method in PROMPT_METHODS else "both"
    if args.rank_by in (None, "specific") and args.sign == specific_sign:
        return "specific"
    if args.rank_by in (None, "score"):
        return "score"
    raise UsageError(f"--sign {args.sign} with --rank-by {args.rank_by}: the {args.rank_by} ranking of method "
                     f"{args.method} is --sign {specific_sign if args.rank_by == 'specific' else 'both'}; "
                     f"use --rank-by score for a signed raw ranking")


def signed_top(fetch, sign: str, top: int):
    """The first `top` rows per ablation, in rank order, whose effect has the sign (carry: < 0, suppress:
    > 0); `fetch(count)` reads the top `count` rows by |effect| per ablation. Reads more rows until each
    ablation has enough or the ranking is exhausted; rank keeps the raw rank."""
    from collections import Counter

    import pyarrow.compute as pc

    count = 2 * top
    while True:
        table = fetch(count)
        wanted = pc.less(table["effect"], 0) if sign == "carry" else pc.greater(table["effect"], 0)
        picked = table.filter(wanted)
        per = {}
        for i, ablation in enumerate(picked.column("ablation").to_pylist()):
            per.setdefault(ablation, []).append(i)
        shown = Counter(table.column("ablation").to_pylist())  # rows read per ablation
        if all(len(per.get(a, [])) >= top or shown[a] < count for a in shown):
            return picked.take([i for a in sorted(per) for i in per[a][:top]])
        count *= 4


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
            more = f" (first 10 of {generic.num_rows}; --format json lists the ranking whole)" \
                if generic.num_rows > 10 else ""
            print(f"{generic.num_rows} neurons are in the top-100 of every concept of this run (generic: their "
                  f"contrastive score is lower than their score): {shown}{more}", file=sys.stderr)
        table = table.select(["contrastive_rank", "layer", "neuron", "contrastive_score", "score", "rank",
                              "closest_concept", "closest_score", "ablation"])
    write_table(table, args.format)
    return 0


MAX_QUERY_BYTES = 1 << 20  # a query file larger than this is refused


def _read_query(args: argparse.Namespace) -> str:
    """The query from the argument, -f FILE, or stdin ('-'); one of them, at most MAX_QUERY_BYTES."""
    if args.file is not None and args.query is not None:
        raise UsageError("give the query as an argument or with -f FILE, not both")
    source = args.file if args.file is not None else args.query
    if source is None:
        raise UsageError("no query: give one SELECT as an argument, with -f FILE, or '-' to read stdin")
    if args.file is None and source != "-":
        return source
    name = "stdin" if source == "-" else repr(source)
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_QUERY_BYTES + 1)
        else:
            with open(source, "rb") as f:
                data = f.read(MAX_QUERY_BYTES + 1)
    except OSError as e:
        raise UsageError(f"query file {name}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_QUERY_BYTES:
        raise UsageError(f"query file {name} is larger than {MAX_QUERY_BYTES:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"query file {name} is not UTF-8 text") from None


def cmd_sql(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from jobs.output import write_csv_batches, write_json_batches
    from storage.read import bounded, open_sql

    query = _read_query(args)
    if args.limit is not None and args.limit < 0:
        raise UsageError(f"--limit {args.limit}: expected a number of rows >= 0")
    if args.timeout < 0:
        raise UsageError(f"--timeout {args.timeout:g}: expected seconds >= 0 (0: no limit)")
    limit = None if args.no_limit else args.limit
    if limit is None and args.format == "table" and not args.no_limit:
        limit = SQL_TABLE_ROWS
    with open_sql(args.atlas, query, run_id=args.run_id, as_of=args.as_of, memory_limit=args.memory_limit) as stream:
        def work():
            schema, batches = stream.result()
            kept = _first_rows(batches, limit)
            if args.format == "csv":
                write_csv_batches(schema, kept, sys.stdout)
            elif args.format == "json":
                write_json_batches(schema, kept, sys.stdout)
            else:
                write_table(pa.Table.from_batches(list(kept), schema=schema), "table")
            return kept.cut

        cut = bounded(work, stream, args.timeout or None)
    if cut:
        hint = "--limit N or --no-limit" if args.limit is None else "a larger --limit or --no-limit"
        print(f"note: showing the first {limit:,} rows; the query has more ({hint}; --format csv streams "
              f"them all)", file=sys.stderr)
    return 0


class _first_rows:
    """The batches cut to `limit` rows in all (None: no cut); `cut` tells whether rows were left out."""

    def __init__(self, batches, limit: int | None):
        self.batches, self.limit, self.cut = batches, limit, False

    def __iter__(self):
        left = self.limit
        for batch in self.batches:
            if left is not None and batch.num_rows > left:
                self.cut = True
                if left:
                    yield batch.slice(0, left)
                return
            if left is not None:
                left -= batch.num_rows
            yield batch


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
    if fmt == "csv":  # list columns as JSON, times as ISO 8601 (jobs/output.py)
        from jobs.output import write_csv_batches

        write_csv_batches(table.schema, table.to_batches(), stream)
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
    except KeyboardInterrupt:  # Ctrl-C before main's own handler was in place (while importing)
        print("\ninterrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
