"""`neuron-atlas schedule` (nightly re-attribution through the Ray Jobs API) and `neuron-atlas drift`
(how each scheduled run's rankings moved from the previous run of its family). README "Nightly
re-attribution" documents the config section, exit statuses and the drift alert line.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys


def register(sub) -> None:
    schedule = sub.add_parser(
        "schedule", help="submit each config's due run (cron schedule) through the Ray Jobs API, exactly once",
        description="Exit status with --once: 0 ok (submitted, already submitted, skipped, nothing due), "
                    "1 a submission (or, with --wait, a job) failed, 2 bad input, 3 a run drifted past a threshold.")
    schedule.add_argument("configs", nargs="+", metavar="CONFIG", help="job configs with a schedule: section")
    schedule.add_argument("--once", action="store_true",
                          help="one tick, then exit (for cron, a Kubernetes CronJob, a systemd timer)")
    schedule.add_argument("--now", help="the tick's time (ISO 8601; default: the clock); without --once the "
                                        "scheduler's clock starts there")
    schedule.add_argument("--force", action="store_true", help="submit even when the fingerprint is unchanged")
    schedule.add_argument("--wait", action="store_true",
                          help="with --once: wait for the submitted jobs, then report their drift")
    schedule.add_argument("--dry-run", action="store_true",
                          help="print what is due (run id, fingerprint, submit or skip) and submit nothing")
    schedule.set_defaults(handler=cmd_schedule)

    drift = sub.add_parser("drift", help="drift of runs from the previous run of their model family")
    drift.add_argument("--atlas", required=True)
    drift.add_argument("--model", help="a model or family name")
    drift.add_argument("--since", help="recorded at or after this ISO 8601 time")
    drift.add_argument("--run", dest="run_id", help="one run's drift")
    drift.add_argument("--format", choices=("table", "json", "csv"), default="table")
    drift.set_defaults(handler=cmd_drift)


def cmd_schedule(args: argparse.Namespace) -> int:
    from cluster.schedule import Clock, parse_time, serve, tick

    now = parse_time(args.now) if args.now else None
    if args.wait and not args.once:
        from jobs.cli import UsageError

        raise UsageError("--wait goes with --once (a long-running scheduler never waits on a job)")
    if args.dry_run:
        return _dry_run(args.configs, now or Clock().now(), force=args.force)
    if args.once:
        report = tick(args.configs, now=now or Clock().now(), force=args.force, wait=args.wait,
                      out=sys.stdout)
        return report.exit_status
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # finish the tick, then exit 0
    serve(args.configs, clock=Clock(now), force=args.force, out=sys.stdout, should_stop=lambda: bool(stop))
    print("schedule: stopped", file=sys.stderr)
    return 0


def _dry_run(paths: list[str], now, *, force: bool) -> int:
    from cluster.schedule import _stamp, due_jobs, due_time, latest_run, load_schedule

    for config in [load_schedule(p) for p in paths]:
        due = due_time(config, now)
        if due is None:
            print(json.dumps({"config": config.source, "due": None}))
            continue
        for job in due_jobs(config, due):
            latest = latest_run(job.config, job.model_name, job.fingerprint.concept_set)
            unchanged = latest is not None and latest[1] == job.fingerprint.id
            action = "skip" if unchanged and not force else "submit"
            print(json.dumps({"config": config.source, "schedule": job.label, "scheduled_for": _stamp(due),
                              "submission_id": job.submission_id, "address": job.address, "model": job.model_name,
                              "model_revision": job.model_revision, "fingerprint": job.fingerprint.as_dict(),
                              "latest_run": latest[0] if latest else None, "action": action}))
            print(f"schedule {job.label} due {_stamp(due)}: would {action} {job.submission_id} "
                  f"(model {job.model_name} {job.model_revision}, {job.fingerprint.id})", file=sys.stderr)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from cluster.schedule import parse_time
    from jobs.cli import write_table
    from storage.drift import read_drift

    since = parse_time(args.since, "--since") if args.since else None
    table = read_drift(args.atlas, model=args.model, since=since, run_id=args.run_id)
    if args.format == "table":
        table = table.select(["run_id", "previous_run_id", "model", "concept", "method", "ablation", "k", "kept",
                              "entered", "left", "churn", "spearman", "drifted", "reason", "created_at"])
    write_table(table, args.format)
    return 0
