"""Submit a job to a Ray cluster through the Ray Jobs API, and report on it.

A thin layer over `ray.job_submission.JobSubmissionClient`. The job carries the project's packages
and the job config (its concept file copied in) as its working directory; the entrypoint runs
`python -m jobs.cli run` on the head node. The run id is the submission id: Ray refuses a second job
with the same id, so a run id is never run twice on one cluster. Paths in the config that are not
carried (the model directory, the atlas) must exist on the cluster's nodes, or be URLs.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import yaml

from cluster.config import JobConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attribution", "cluster", "jobs", "storage", "configs")  # configs: the neutral reference text
JOB_DIR = "job"  # inside the working directory: config.yaml and the concept file it names
# Submitted jobs never download: models come from the nodes' disks, tokenizers from their caches.
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
AGENT_WAIT_SECONDS = 60
AUTH_HINT = ("set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
             "~/.ray/auth_token) in this shell, as on the cluster's nodes")


class SubmitError(Exception):
    """The cluster could not be reached, refused the request, or does not know the job."""


@dataclass(frozen=True)
class Submission:
    submission_id: str  # the run id; ID-resume-N for a resumed run
    address: str
    entrypoint: str
    run_id: str = ""


@dataclass(frozen=True)
class JobState:
    submission_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    entrypoint: str

    @property
    def finished(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED")

    def as_dict(self) -> dict:
        return {"submission_id": self.submission_id, "status": self.status, "message": self.message,
                "start_time": self.start_time, "end_time": self.end_time, "entrypoint": self.entrypoint}


def submission_run_id(config: JobConfig) -> str:
    """A run id for a submission without --run-id: UTC time and a hash of the config (as `run` does)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    digest = hashlib.sha256(json.dumps(config.snapshot(), sort_keys=True, default=str).encode())
    return f"{stamp}-{digest.hexdigest()[:8]}"


def job_config_data(config: JobConfig, *, concepts: str) -> dict:
    """The config as YAML data for the cluster: every override applied, the concept file replaced by
    `concepts`; no cluster address (the job's driver connects to the cluster it runs in)."""
    from storage.location import REDACTED

    data = config.snapshot()
    data.pop("source", None)
    # Credentials never travel in a job's files (the cluster stores them): the cluster's nodes get
    # theirs from the AWS chain; public options (region, endpoint without user:password) go along.
    options = {k: v for k, v in (data.get("storage_options") or {}).items() if v != REDACTED}
    if options:
        data["storage_options"] = options
    else:
        data.pop("storage_options", None)
    data["concepts"] = concepts
    data["methods"] = list(config.methods)
    data["ablation"] = list(config.ablation)
    data["cluster"] = {k: v for k, v in data["cluster"].items() if k != "address"}
    return data


def withheld_options(config: JobConfig) -> list[str]:
    """Names of the config's storage options that are not sent with a job (credentials)."""
    from storage.location import REDACTED, redact_options

    return sorted(k for k, v in (redact_options(config.storage_options) or {}).items() if v == REDACTED)


def copy_packages(directory: str | Path) -> list[str]:
    """Copy the project's packages (those this checkout has) into `directory`: the code a cluster's
    workers import when their image does not have the project. Returns the names copied."""
    copied = []
    for name in PACKAGES:
        if (PROJECT_ROOT / name).is_dir():
            shutil.copytree(PROJECT_ROOT / name, Path(directory) / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            copied.append(name)
    return copied


def package_job(config: JobConfig, directory: Path) -> str:
    """Write the job's working directory: the project packages (unless cluster.ship_code is false:
    the cluster's image has them), the config and its concept file.

    Returns the config's path relative to `directory`.
    """
    if config.cluster.ship_code:
        copy_packages(directory)
    job = directory / JOB_DIR
    job.mkdir()
    concepts = config.concepts
    if "://" not in concepts and Path(concepts).is_file():  # carried; otherwise it must exist on the head
        shutil.copyfile(concepts, job / "concepts.yaml")
        concepts = "concepts.yaml"
    (job / "config.yaml").write_text(yaml.safe_dump(job_config_data(config, concepts=concepts), sort_keys=False))
    return f"{JOB_DIR}/config.yaml"


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise SubmitError(f"the Ray cluster at {address} refused the request: {_first_line(err)}; {AUTH_HINT}") from None
    except (OSError, ValueError, RuntimeError) as err:  # OSError: requests' ConnectionError too
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _call(address: str, what: str, fn, *args):
    """Run one client request; turn Ray's errors into SubmitError with the address and job."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args)
    except AuthenticationError as err:
        raise SubmitError(f"the Ray cluster at {address} refused the request: {_first_line(err)}; {AUTH_HINT}") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        text = str(err)
        if "does not exist" in text or "status code 404" in text:
            raise SubmitError(f"no job {what!r} on the Ray cluster at {address}") from None
        if isinstance(err, ConnectionError):  # the SDK's "Failed to connect to Ray at address"
            raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_first_line(err)}") from None
        raise SubmitError(f"{what}: the Ray cluster at {address} answered: {_first_line(err)}") from None
    except OSError as err:  # requests' ConnectionError: a head still starting closes connections
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_first_line(err)}") from None


def _existing_job(client, address: str, submission_id: str):
    try:
        return _call(address, submission_id, client.get_job_info, submission_id)
    except SubmitError as err:
        if str(err).startswith("no job"):
            return None
        raise


RESUME_TRIES = 100  # resume attempts of one run id: ID-resume-1 .. ID-resume-100


def attempt_ids(run_id: str) -> list[str]:
    """Submission ids of a run: the run id itself, then one per resume."""
    return [run_id] + [f"{run_id}-resume-{n}" for n in range(1, RESUME_TRIES + 1)]


def latest_attempt(client, address: str, run_id: str) -> tuple[str, object] | None:
    """The newest submission of a run (its id and Ray's job info), or None if it was never submitted."""
    found = None
    for submission_id in attempt_ids(run_id):
        info = _existing_job(client, address, submission_id)
        if info is None:
            return found
        found = (submission_id, info)
    return found


@dataclass(frozen=True)
class SubmissionSlot:
    """Where a run's next job goes: the run id, its submission id, and the client that checked it."""

    client: object  # ray.job_submission.JobSubmissionClient
    run_id: str
    submission_id: str


def claim_submission(config: JobConfig, *, address: str, run_id: str | None = None, resume: bool = False,
                     progress: TextIO | None = None) -> SubmissionSlot:
    """The submission id the run's job will take, or SubmitError: a used run id is refused, and
    `resume` takes the next `ID-resume-N` of a run whose last job FAILED or was STOPPED. A few HTTP
    calls: `submit` answers here before it checks the config (seconds of model and tokenizer loading)."""
    run_id = run_id or config.run_id or submission_run_id(config)
    clients: list = []
    _until_agent(lambda: clients.append(_client(address)), address, progress)  # a head just started: wait
    client = clients[0]
    latest = latest_attempt(client, address, run_id)
    submission_id = run_id
    if latest is not None:
        last_id, info = latest
        status = str(info.status)
        if not resume:
            hint = (f"; it ended {status}: resume it with --resume (only its unfinished shards are computed)"
                    if status in ("FAILED", "STOPPED") else "")
            raise SubmitError(f"run id {run_id!r} was already submitted to the Ray cluster at {address} "
                              f"(job {last_id}, status {status}): choose another --run-id{hint}")
        if status not in ("FAILED", "STOPPED"):
            raise SubmitError(f"run {run_id!r} cannot be resumed: its job {last_id} is {status} "
                              f"on the Ray cluster at {address}")
        index = attempt_ids(run_id).index(last_id) + 1
        if index >= len(attempt_ids(run_id)):
            raise SubmitError(f"run {run_id!r} was resumed {RESUME_TRIES} times: choose another --run-id")
        submission_id = attempt_ids(run_id)[index]
    elif resume:
        raise SubmitError(f"run {run_id!r} was never submitted to the Ray cluster at {address}: nothing to resume")
    return SubmissionSlot(client, run_id, submission_id)


def submit_job(config: JobConfig, slot: SubmissionSlot, *, address: str,
               progress: TextIO | None = None) -> Submission:
    """Submit the run to the cluster as `slot.submission_id` (from `claim_submission`); the run id is
    the submission id, or its `ID-resume-N`, so the new job scores only the shards a failed one did not
    stage, and commits once."""
    run_id, submission_id, client = slot.run_id, slot.submission_id, slot.client
    config = replace(config, run_id=run_id)
    with tempfile.TemporaryDirectory(prefix="neuron-atlas-job-") as tmp:
        config_path = package_job(config, Path(tmp))
        entrypoint = f"python -m jobs.cli run {config_path} --run-id {run_id}"
        runtime_env = {"working_dir": tmp, "env_vars": dict(JOB_ENV)}
        placement = entrypoint_options(config)

        tries = []

        def send() -> None:
            tries.append(1)
            try:
                _call(address, submission_id,
                      lambda: client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                                submission_id=submission_id, **placement,
                                                metadata={"neuron_atlas_run_id": run_id}))
            except SubmitError as err:
                if "already exists" in str(err) and len(tries) > 1:
                    return  # an earlier try reached the head, its answer was lost: that submission stands
                if "already exists" in str(err):  # submitted by someone else since the check above
                    raise SubmitError(f"run id {run_id!r} was already submitted to the Ray cluster at {address} "
                                      f"(job {submission_id}): choose another --run-id") from None
                raise

        _until_agent(send, address, progress)
    return Submission(submission_id=submission_id, address=address, entrypoint=entrypoint, run_id=run_id)


def with_entrypoint(config: JobConfig, *, num_cpus: float | None = None, memory_gb: float | None = None,
                    resources: list[str] | None = None) -> JobConfig:
    """The config with submit's --entrypoint-* flags applied (None: not given); bad values raise ConfigError."""
    from cluster.config import ConfigError

    source = f"{config.source} (command line)"
    changes: dict = {}
    for key, value in (("entrypoint_num_cpus", num_cpus), ("entrypoint_memory_gb", memory_gb)):
        if value is not None:
            if value < 0:
                raise ConfigError(f"config {source}: key 'cluster.{key}' has value {value!r}: expected a number >= 0")
            changes[key] = value
    if resources:
        parsed = dict(config.cluster.entrypoint_resources or {})
        for item in resources:
            name, _, amount = item.partition("=")
            try:
                value = float(amount)
            except ValueError:
                value = -1.0
            if not name or value < 0:
                raise ConfigError(f"config {source}: key 'cluster.entrypoint_resources' has value {item!r}: "
                                  f"expected NAME=AMOUNT with an amount >= 0")
            parsed[name] = value
        changes["entrypoint_resources"] = parsed
    return replace(config, cluster=replace(config.cluster, **changes)) if changes else config


def entrypoint_options(config: JobConfig) -> dict:
    """Where Ray places the job's driver (JobSubmissionClient.submit_job's entrypoint_* arguments):
    off the head when the config asks for CPUs, memory or a resource only worker nodes have."""
    cluster, out = config.cluster, {}
    if cluster.entrypoint_num_cpus:
        out["entrypoint_num_cpus"] = cluster.entrypoint_num_cpus
    if cluster.entrypoint_memory_gb:
        out["entrypoint_memory"] = int(cluster.entrypoint_memory_gb * 1e9)
    if cluster.entrypoint_resources:
        out["entrypoint_resources"] = dict(cluster.entrypoint_resources)
    return out


def _agent_not_up(err: SubmitError) -> bool:
    """A head that has just started: its dashboard does not answer yet, or its job agent is not up."""
    text = str(err)
    return (text.startswith("cannot reach the Ray Jobs API")
            or any(sign in text for sign in ("No available agent", "status code 502", "status code 503", "status code 504")))


def _until_agent(send, address: str, progress: TextIO | None, *, wait: float | None = None) -> None:
    """Call send() until the head's job agent takes the request: retried with backoff (0.5 s doubling to
    8 s) for up to AGENT_WAIT_SECONDS (or NEURON_ATLAS_AGENT_WAIT seconds: a head on a busy node can
    take longer), with a line on `progress` each time."""
    if wait is None:
        try:
            wait = float(os.environ.get("NEURON_ATLAS_AGENT_WAIT", AGENT_WAIT_SECONDS))
        except ValueError:
            wait = AGENT_WAIT_SECONDS
    started = time.monotonic()
    delay = 0.5
    while True:
        try:
            return send()
        except SubmitError as err:
            if not _agent_not_up(err):
                raise
            waited = time.monotonic() - started
            if waited + delay > wait:
                raise SubmitError(f"{err}; waited {waited:.0f} s for the head's job agent: is the head up, and "
                                  f"its agent's port (ray start --dashboard-agent-listen-port, default 52365) "
                                  f"free of other processes?") from None
            if progress is not None:
                print(f"waiting for the job agent of the Ray cluster at {address} ({waited:.0f} s of "
                      f"{wait:.0f}): {_first_line(err)}", file=progress, flush=True)
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


def job_state(address: str, submission_id: str) -> JobState:
    info = _call(address, submission_id, _client(address).get_job_info, submission_id)
    return JobState(submission_id=submission_id, status=str(info.status), message=info.message or "",
                    start_time=info.start_time / 1000 if info.start_time else None,
                    end_time=info.end_time / 1000 if info.end_time else None, entrypoint=info.entrypoint)


def job_logs(address: str, submission_id: str) -> str:
    return _call(address, submission_id, _client(address).get_job_logs, submission_id)


def follow_logs(address: str, submission_id: str, stream: TextIO) -> None:
    """Copy the job's logs to `stream` as they are written, until the job ends."""
    client = _client(address)
    _call(address, submission_id, client.get_job_info, submission_id)  # a clear error for an unknown id

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            stream.write(chunk)
            stream.flush()

    _call(address, submission_id, lambda: asyncio.run(tail()))


def wait_for_job(address: str, submission_id: str, *, poll_seconds: float = 1.0,
                 timeout: float | None = None) -> JobState:
    """Block until the job is SUCCEEDED, FAILED or STOPPED."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = job_state(address, submission_id)
        if state.finished:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {submission_id!r} still {state.status} after {timeout:.0f} s")
        time.sleep(poll_seconds)
