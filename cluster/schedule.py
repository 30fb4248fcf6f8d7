"""Nightly re-attribution: submit each job config's due run through the Ray Jobs API, exactly once.

Stateless by design: a tick derives the due time from the cron expression and the clock (the latest
fire time <= now), and the submission id from the config, the fingerprint and that due time. Ray
Jobs refuses a second job with the same submission id, so a restarted scheduler, two schedulers at
once, or a tick fired twice submit a due run once; a scheduler that was down over several fire times
submits only the latest one. A due job whose fingerprint equals the latest committed run's (same
model, same concept set) is skipped. README "Nightly re-attribution".
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TextIO

from cluster.config import ConfigError, JobConfig, load_job_config
from cluster.cron import next_fire, parse_cron, previous_fire
from cluster.fingerprint import SCHEDULED_FOR_ENV, Fingerprint, concept_set_label, job_fingerprint

# Exit statuses of a tick (README): 0 ok (submitted, skipped, nothing due), 1 a submission or a waited
# job failed, 2 bad input, 3 a run drifted past a threshold of its config.
EXIT_OK, EXIT_FAILED, EXIT_DRIFTED = 0, 1, 3
RETRY_WAKE_SECONDS = 60  # a long-running scheduler whose submission failed tries again this often


class Clock:
    """UTC now; started at `start` (--now) it runs on from there in real time."""

    def __init__(self, start: datetime | None = None):
        self._start = start
        self._t0 = time.monotonic()

    def now(self) -> datetime:
        if self._start is None:
            return datetime.now(timezone.utc)
        return self._start + timedelta(seconds=time.monotonic() - self._t0)


def parse_time(text: str, what: str = "--now") -> datetime:
    """An ISO 8601 time; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected an ISO 8601 time such as 2026-12-02T02:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- what is due -------------------------------------------------------------------------------

def newest_checkpoint(spec: str, *, source: str) -> str:
    """`spec` itself, or for a glob or a directory of checkpoints (no config.json of its own) the
    matching model directory whose weights were written last (ties: the greater name)."""
    is_glob = any(c in spec for c in "*?[")
    if not is_glob and not (os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json"))):
        return spec
    pattern = spec if is_glob else os.path.join(spec, "*")
    candidates = [p for p in glob.glob(pattern) if os.path.isfile(os.path.join(p, "config.json"))
                  and glob.glob(os.path.join(p, "*.safetensors"))]
    if not candidates:
        raise ConfigError(f"config {source}: key 'schedule.model' has value {spec!r}: no checkpoint directory "
                          f"(config.json and *.safetensors) matches it")

    def written(path: str) -> tuple[float, str]:
        return max(os.stat(f).st_mtime for f in glob.glob(os.path.join(path, "*.safetensors"))), path

    return max(candidates, key=written)


@dataclass(frozen=True)
class DueJob:
    """One run a tick considers: a config's concept set at the due time, with what it would compute."""

    source: str  # the config file
    config: JobConfig  # the job's config: model resolved, one concept set, labels set, run_id = submission id
    scheduled_for: datetime  # UTC
    model_name: str
    model_revision: str
    fingerprint: Fingerprint
    address: str

    @property
    def submission_id(self) -> str:
        return self.config.run_id

    @property
    def label(self) -> str:
        return f"{self.fingerprint.family}/{self.fingerprint.concept_set}"


def submission_id(config: JobConfig, fingerprint: Fingerprint, scheduled_for: datetime) -> str:
    """A run id (= Ray submission id) that is the same wherever and however often it is computed:
    family, concept set, due time and a hash of the config's content, the fingerprint and the due time.
    Machine-specific paths (the config, concept file and model locations) are left out of the hash:
    their content is in the fingerprint."""
    data = config.snapshot()
    for key in ("source", "concepts", "model", "run_id", "schedule"):
        data.pop(key, None)
    data["cluster"].pop("address", None)
    digest = hashlib.sha256(json.dumps([data, fingerprint.id, _stamp(scheduled_for)], sort_keys=True,
                                       default=str).encode()).hexdigest()[:10]
    stamp = scheduled_for.astimezone(timezone.utc).strftime("%Y%m%dt%H%M")
    head = f"{fingerprint.family}-{fingerprint.concept_set}"[:100]
    return re.sub(r"[^a-z0-9_.-]", "-", f"{head}-{stamp}-{digest}")


def schedule_address(config: JobConfig) -> str:
    address = (config.schedule.address if config.schedule else None) or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ConfigError(f"config {config.source}: no Ray Jobs API to submit to: set schedule.address "
                          f"(http://HEAD:8265) or RAY_API_SERVER_ADDRESS")
    return address


def load_schedule(path: str | Path) -> JobConfig:
    config = load_job_config(path)
    if config.schedule is None:
        raise ConfigError(f"config {config.source}: has no 'schedule' section (e.g. schedule: {{cron: '0 2 * * *'}})")
    return config


def due_time(config: JobConfig, now: datetime) -> datetime | None:
    schedule = config.schedule
    return previous_fire(parse_cron(schedule.cron), now, schedule.timezone)


def due_jobs(config: JobConfig, scheduled_for: datetime) -> list[DueJob]:
    """The runs `config` asks for at `scheduled_for`: one per concept set, on the newest checkpoint."""
    from attribution.concepts import load_concept_file
    from attribution.errors import AttributionError
    from attribution.models import resolve_model_source
    from cluster.plan import check_before_submit, config_value

    schedule = config.schedule
    spec = schedule.model or config.model
    if any(c in spec for c in "*?[") and not os.path.isabs(spec):  # a glob in `model`: relative to the config
        spec = str(Path(config.source).resolve().parent / spec)
    model_spec = newest_checkpoint(spec, source=config.source)
    with config_value(config, "schedule.model" if schedule.model else "model", model_spec):
        try:
            model = resolve_model_source(model_spec)
        except AttributionError as err:
            raise ConfigError(f"config {config.source}: model {model_spec!r} must be on the scheduler's machine "
                              f"too (its weights are hashed for the fingerprint): {err}") from None
    address = schedule_address(config)
    if os.path.exists(model_spec):  # a path on this machine: the same path on the cluster's nodes
        model_spec = os.path.abspath(model_spec)
    jobs = []
    for concepts in schedule.concepts or (config.concepts,):
        job = replace(config, model=model_spec, concepts=concepts, methods=schedule.methods or config.methods,
                      run_id=None, schedule=replace(schedule, concept_set=None))
        # The concept set's label: the schedule's concept_set for a single set, else the file's stem.
        label = schedule.concept_set if schedule.concept_set and len(schedule.concepts) <= 1 else concept_set_label(job)
        job = replace(job, schedule=replace(schedule, concept_set=label, model=None, concepts=(), methods=()))
        with config_value(job, "concepts", concepts):
            concept_list = load_concept_file(concepts)
        check_before_submit(job)  # layers, targets, methods: a bad config exits 2 here, not as a FAILED job
        fingerprint = job_fingerprint(job, model=model, concepts=concept_list)
        job = replace(job, run_id=submission_id(job, fingerprint, scheduled_for))
        jobs.append(DueJob(source=config.source, config=job, scheduled_for=scheduled_for, model_name=model.name,
                           model_revision=model.revision, fingerprint=fingerprint, address=address))
    return jobs


def latest_run(config: JobConfig, model_name: str, concept_set: str) -> tuple[str, str | None] | None:
    """(run id, fingerprint id) of the newest committed run of the model and concept set, or None."""
    from storage.read import list_runs

    for row in list_runs(config.atlas, config.storage_options).to_pylist():  # newest first
        if row["model"] != model_name:
            continue
        fingerprint = json.loads(row["metadata_json"] or "{}").get("fingerprint") or {}
        if fingerprint.get("concept_set") == concept_set:
            return row["run_id"], fingerprint.get("id")
    return None


# ---- submitting ----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a tick did with one due job (printed as one JSON line)."""

    config: str
    schedule: str  # family/concept set
    scheduled_for: str
    submission_id: str
    action: str  # submitted | already-submitted | skipped | failed
    reason: str
    model: str
    model_revision: str
    fingerprint: str
    status: str | None = None  # the Ray job's status, once known

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _client(address: str):
    from cluster.submit import SubmitError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # unreachable, refused, no token: the caller retries or reports it
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _job_status(client, submission: str) -> str | None:
    """The job's status, or None when the cluster has no job of that id."""
    try:
        return str(client.get_job_info(submission).status)
    except RuntimeError as err:
        if "does not exist" in str(err) or "404" in str(err):
            return None
        raise


def _in_flight(client, fingerprint: str) -> str | None:
    """A job of this fingerprint still PENDING or RUNNING (an earlier due time's, not committed yet)."""
    for job in client.list_jobs():
        meta = job.metadata or {}
        if meta.get("neuron_atlas_fingerprint") == fingerprint and str(job.status) in ("PENDING", "RUNNING"):
            return job.submission_id
    return None


def _submit_once(client, job: DueJob) -> None:
    from cluster.submit import JOB_ENV, package_job

    with tempfile.TemporaryDirectory(prefix="neuron-atlas-sched-") as tmp:
        config_path = package_job(job.config, Path(tmp))
        entrypoint = f"python -m jobs.cli run {config_path} --run-id {job.submission_id}"
        env = {**JOB_ENV, SCHEDULED_FOR_ENV: _stamp(job.scheduled_for)}
        client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": tmp, "env_vars": env},
                          submission_id=job.submission_id,
                          metadata={"neuron_atlas_run_id": job.submission_id,
                                    "neuron_atlas_fingerprint": job.fingerprint.id,
                                    "neuron_atlas_schedule": job.label,
                                    "neuron_atlas_scheduled_for": _stamp(job.scheduled_for)})


def submit_due(job: DueJob, *, force: bool = False, log: TextIO = sys.stderr, sleep=time.sleep) -> Outcome:
    """Submit one due job unless it was submitted already or its fingerprint is unchanged; a failed
    request is retried `schedule.retries` times with exponential backoff."""
    schedule = job.config.schedule
    outcome = Outcome(config=job.source, schedule=job.label, scheduled_for=_stamp(job.scheduled_for),
                      submission_id=job.submission_id, action="failed", reason="", model=job.model_name,
                      model_revision=job.model_revision, fingerprint=job.fingerprint.id)
    head = f"schedule {job.label} due {outcome.scheduled_for}"
    delay = schedule.retry_seconds
    for attempt in range(schedule.retries + 1):
        try:
            client = _client(job.address)
            status = _job_status(client, job.submission_id)
            if status is not None:
                outcome.action, outcome.status = "already-submitted", status
                outcome.reason = f"job {job.submission_id} is on the cluster ({status})"
                break
            if not force:
                latest = latest_run(job.config, job.model_name, job.fingerprint.concept_set)
                if latest is not None and latest[1] == job.fingerprint.id:
                    outcome.action = "skipped"
                    outcome.reason = (f"fingerprint {job.fingerprint.id} equals that of run {latest[0]}, the latest "
                                      f"of model {job.model_name} and concept set {job.fingerprint.concept_set}: "
                                      f"weights, concepts, methods and version unchanged (--force runs it anyway)")
                    break
                running = _in_flight(client, job.fingerprint.id)
                if running is not None:
                    outcome.action = "skipped"
                    outcome.reason = f"job {running} with fingerprint {job.fingerprint.id} is still running"
                    break
            _submit_once(client, job)
            outcome.action, outcome.status = "submitted", "PENDING"
            outcome.reason = f"fingerprint {job.fingerprint.id}" + (" (--force)" if force else "")
            break
        except Exception as err:  # noqa: BLE001 - any failed request is retried, then reported
            if "already exists" in str(err):  # another scheduler submitted it between our check and now
                outcome.action, outcome.reason = "already-submitted", f"job {job.submission_id} was submitted by another scheduler"
                break
            if isinstance(err, ConfigError):
                raise
            outcome.reason = f"{type(err).__name__}: {_first_line(err)}"
            if attempt < schedule.retries:
                print(f"{head}: submission failed (attempt {attempt + 1} of {schedule.retries + 1}): "
                      f"{outcome.reason}; retrying in {delay:g} s", file=log, flush=True)
                sleep(delay)
                delay *= 2
    verb = {"submitted": f"submitted {job.submission_id}", "already-submitted": "already submitted",
            "skipped": "skipped", "failed": f"failed after {schedule.retries + 1} attempts"}[outcome.action]
    print(f"{head}: {verb}: {outcome.reason} (model {job.model_name} {job.model_revision})", file=log, flush=True)
    return outcome


# ---- drift -------------------------------------------------------------------------------------

def record_run_drift(config: JobConfig, run_id: str, *, stream: TextIO | None = None) -> list[dict]:
    """Compute and store a committed run's drift (once), print its summary and an alert line per
    drifted block; returns the run's drift rows (recorded now or before)."""
    from storage.drift import alert_line, commit_drift, compute_drift, read_drift, summary_line
    from storage.errors import AtlasError

    stream = stream or sys.stderr
    thresholds = config.schedule.drift if config.schedule is not None else None
    try:
        rows = read_drift(config.atlas, config.storage_options, run_id=run_id)
        if rows.num_rows == 0:
            options = thresholds.as_data() if thresholds is not None else {}
            rows = compute_drift(config.atlas, run_id, storage_options=config.storage_options, **options)
            commit_drift(config.atlas, rows, run_id=run_id, storage_options=config.storage_options)
            rows = read_drift(config.atlas, config.storage_options, run_id=run_id) if rows.num_rows else rows
    except AtlasError as err:  # the run is committed either way; the next tick catches up
        print(f"warning: drift of run {run_id} not recorded: {err}", file=stream, flush=True)
        return []
    out = rows.to_pylist()
    for row in out:
        print(summary_line(row), file=stream, flush=True)
        if row["drifted"]:
            print(alert_line(row), file=stream, flush=True)
    return out


def family_runs_since(config: JobConfig, since: datetime | None) -> list[str]:
    """Run ids of the config's family committed after `since` (all if None), oldest first."""
    from storage.drift import run_family
    from storage.read import list_runs

    family = config.schedule.name
    runs = []
    for row in list_runs(config.atlas, config.storage_options).to_pylist():
        meta = json.loads(row["metadata_json"] or "{}")
        if run_family(meta, row["model"]) == family and (since is None or row["created_at"] > since):
            runs.append((row["neurons_version"], row["run_id"]))
    return [run_id for _, run_id in sorted(runs)]


# ---- ticks ---------------------------------------------------------------------------------------

@dataclass
class TickReport:
    outcomes: list[Outcome] = field(default_factory=list)
    drifted: list[dict] = field(default_factory=list)  # drift rows over a threshold, reported by this tick

    @property
    def exit_status(self) -> int:
        if any(o.action == "failed" for o in self.outcomes):
            return EXIT_FAILED
        return EXIT_DRIFTED if self.drifted else EXIT_OK


def _print_outcomes(outcomes: list, out) -> None:
    for outcome in outcomes:
        if out is not None:
            print(json.dumps(outcome.as_dict()), file=out, flush=True)


def tick(paths: list[str], *, now: datetime, force: bool = False, wait: bool = False,
         log: TextIO = sys.stderr, out: TextIO | None = None, alerted: set | None = None,
         wait_timeout: float | None = None) -> TickReport:
    """One pass over the configs at time `now`: submit what is due, then report drift.

    Drift: with `wait`, this tick waits for the jobs it submitted (or found submitted) and reports
    theirs; otherwise it reports runs of each family committed since the fire time before the due
    one (the previous tick's work), recording any drift a driver did not. `alerted` (a long-running
    scheduler's memory) keeps a run from being reported twice by one process.
    """
    from cluster.submit import SubmitError, wait_for_job

    configs = [load_schedule(p) for p in paths]  # every config is checked before anything is submitted
    report = TickReport()
    for path, config in zip(paths, configs):
        due = due_time(config, now)
        if due is None:
            print(f"schedule {config.schedule.name}: cron {config.schedule.cron!r} has no fire time before "
                  f"{_stamp(now)}", file=log)
            continue
        jobs = due_jobs(config, due)
        outcomes = [submit_due(job, force=force, log=log) for job in jobs]
        report.outcomes += outcomes
        if wait:  # each outcome is printed once its job has finished, with its final status
            runs = []
            for job, outcome in zip(jobs, outcomes):
                if outcome.action not in ("submitted", "already-submitted"):
                    continue
                try:
                    state = wait_for_job(job.address, job.submission_id, poll_seconds=2.0, timeout=wait_timeout)
                except SubmitError as err:
                    outcome.action, outcome.reason = "failed", str(err)
                    continue
                outcome.status = state.status
                print(f"schedule {job.label} due {outcome.scheduled_for}: job {job.submission_id} {state.status}",
                      file=log, flush=True)
                if state.status == "SUCCEEDED":
                    runs.append(job.submission_id)
                else:
                    outcome.action, outcome.reason = "failed", f"job {job.submission_id} {state.status}: {state.message}"
            _print_outcomes(outcomes, out)
        else:  # a long-running scheduler: each outcome is printed at submission
            _print_outcomes(outcomes, out)
            before = previous_fire(parse_cron(config.schedule.cron), due - timedelta(minutes=1), config.schedule.timezone)
            runs = family_runs_since(config, before)
        for run_id in runs:
            rows = record_run_drift(config, run_id, stream=log)
            for row in rows:
                key = (row["run_id"], row["concept"], row["method"], row["ablation"])
                if row["drifted"] and (alerted is None or key not in alerted):
                    report.drifted.append(row)
                    if alerted is not None:
                        alerted.add(key)
    return report


def serve(paths: list[str], *, clock: Clock, force: bool = False, log: TextIO = sys.stderr,
          out: TextIO | None = None, should_stop=lambda: False, poll: float = 1.0) -> None:
    """The long-running scheduler: a tick now, then one at every fire time of any config (and every
    RETRY_WAKE_SECONDS while a submission is failing), until `should_stop()`."""
    alerted: set = set()
    while not should_stop():
        now = clock.now()
        report = tick(paths, now=now, force=force, log=log, out=out, alerted=alerted)
        wake = min((next_fire(parse_cron(c.schedule.cron), now, c.schedule.timezone) or now + timedelta(days=366)
                    for c in (load_schedule(p) for p in paths)), default=now + timedelta(days=1))
        if report.exit_status == EXIT_FAILED:
            wake = min(wake, now + timedelta(seconds=RETRY_WAKE_SECONDS))
        print(f"schedule: next tick at {_stamp(wake)}", file=log, flush=True)
        while not should_stop() and clock.now() < wake:
            time.sleep(min(poll, max(0.05, (wake - clock.now()).total_seconds())))
