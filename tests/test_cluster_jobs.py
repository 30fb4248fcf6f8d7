"""Ray Jobs on a real two-node Ray cluster on loopback (`ray start --head` plus a worker node, token
authentication on): submit, status, logs, a refused duplicate run id, a failing job, a client
without the token. The CLI runs as a subprocess, as a user runs it."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from cluster.config import load_job_config
from cluster.plan import resolve_job
from cluster.scorer import ScorerSpec, ShardScorer
from storage.read import open_neurons, run_metadata
from storage.staging import claim_staging

BIN = Path(sys.executable).parent
UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    gcs: str  # 127.0.0.1:PORT
    jobs_api: str  # http://127.0.0.1:PORT
    env: dict  # what a client needs: RAY_AUTH_MODE=token and the token
    processes: list


def _http_ok(url: str, token: str) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _alive_nodes(jobs_api: str, token: str) -> int:
    request = urllib.request.Request(f"{jobs_api}/api/v0/nodes", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            nodes = json.load(response)["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return 0
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


def _stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the `ray start --block` process (it stops the node's processes), then SIGKILL its
    process group (start_new_session: only what this test started) for anything left behind."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (2 CPUs, dashboard and Jobs API on 127.0.0.1) and a worker node (1 CPU) joined to it,
    with token authentication as Ray 2.60 sets it up: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on every
    node and on every client."""
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    temp_dir = tempfile.mkdtemp(prefix="na-ray-", dir="/tmp")  # short: Unix socket paths are limited
    port, dashboard_port = free_port(), free_port()
    jobs_api = f"http://127.0.0.1:{dashboard_port}"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(80 * 1024**2),
              "--disable-usage-stats"]
    processes: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        process = subprocess.Popen([str(BIN / "ray"), "start", *args, *common], env=env, start_new_session=True,
                                   stdout=open(Path(temp_dir) / log, "w"), stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    try:
        # Free ports for everything that has a fixed default: on a shared machine another Ray cluster
        # may hold them (a head whose job agent cannot bind its port accepts no jobs).
        head = start(["--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                      "--dashboard-port", str(dashboard_port), "--dashboard-agent-listen-port", str(free_port()),
                      "--ray-client-server-port", str(free_port()), "--num-cpus", "2", "--temp-dir", temp_dir],
                     "head.log")
        deadline = time.monotonic() + 120
        while not _http_ok(f"{jobs_api}/api/version", token):
            assert head.poll() is None and time.monotonic() < deadline, (Path(temp_dir) / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        # Its own temp dir: on one machine two nodes sharing one would also share the runtime-env
        # folders, and one node's set-up of the job's working directory would pull it from under the other.
        worker_dir = Path(temp_dir) / "w"
        worker = start(["--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--temp-dir", str(worker_dir),
                        "--dashboard-agent-listen-port", str(free_port())], "worker.log")
        while _alive_nodes(jobs_api, token) < 2:
            assert worker.poll() is None and time.monotonic() < deadline, (Path(temp_dir) / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        yield RayCluster(gcs=f"127.0.0.1:{port}", jobs_api=jobs_api, env=env, processes=processes)
    finally:
        for process in reversed(processes):  # the worker first, while the head can still drain it
            _stop(process, timeout=40)
        shutil.rmtree(temp_dir, ignore_errors=True)


def cli(cluster: RayCluster, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "neuron-atlas"), *args], env=env or cluster.env, capture_output=True,
                          text=True, timeout=timeout)


def write_config(path: Path, **values) -> Path:
    data = {"concepts": str(UNSEEN), "layers": [0, 3], "ablation": ["zero", "mean"], "shard_neurons": 40,
            "batch_rows": 32, "cluster": {"actors": 2, "cpus_per_actor": 1}, **values}
    path.write_text(yaml.safe_dump(data))
    return path


def test_submit_status_logs_and_a_refused_duplicate_run_id(ray_cluster, tiny_sources, tmp_path):
    atlas = tmp_path / "atlas"
    # 3 actors of 1 CPU on a cluster of 3 CPUs: the worker node hosts one of them.
    config = write_config(tmp_path / "job.yaml", model=tiny_sources["llama"].path, atlas=str(atlas))
    api = ["--address", ray_cluster.jobs_api]

    submitted = cli(ray_cluster, "submit", str(config), *api, "--run-id", "jobs-1", "--actors", "3")
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip() == "jobs-1"  # the run id is the submission id

    again = cli(ray_cluster, "submit", str(config), *api, "--run-id", "jobs-1")
    assert again.returncode == 2
    assert "run id 'jobs-1' was already submitted" in again.stderr and "choose another --run-id" in again.stderr

    followed = cli(ray_cluster, "logs", "jobs-1", *api, "--follow")
    assert followed.returncode == 0, followed.stderr
    assert "Ray cluster: 2 nodes, 3 CPUs" in followed.stdout, followed.stdout
    assert "committed run jobs-1 as atlas version 1" in followed.stdout, followed.stdout

    status = cli(ray_cluster, "status", "jobs-1", *api, "--format", "json")
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["status"] == "SUCCEEDED" and state["entrypoint"].startswith("python -m jobs.cli run ")
    assert "SUCCEEDED" in cli(ray_cluster, "status", "jobs-1", *api).stdout
    assert "committed run jobs-1" in cli(ray_cluster, "logs", "jobs-1", *api).stdout

    table = open_neurons(str(atlas)).to_pyarrow_table()
    assert table.num_rows == 2 * 2 * 2 * 96  # concepts x ablations x layers x neurons
    assert pc.all(pc.equal(table["run_id"], "jobs-1")).as_py()
    meta = run_metadata(str(atlas), "jobs-1")
    assert meta["shards"]["computed"] == meta["shards"]["planned"] and meta["device"] == "cpu"
    assert meta["config"]["cluster"]["actors"] == 3 and len(meta["timings"]["actors"]) == 3

    unknown = cli(ray_cluster, "status", "no-such-run", *api)
    assert unknown.returncode == 2 and "no job 'no-such-run'" in unknown.stderr


def test_a_failed_job_exits_1_with_wait_and_resumes_under_its_run_id(ray_cluster, tiny_sources, tmp_path):
    atlas = tmp_path / "atlas"
    api = ["--address", ray_cluster.jobs_api]
    config = write_config(tmp_path / "bad.yaml", model=str(tmp_path / "no-such-model"), atlas=str(atlas))
    waited = cli(ray_cluster, "submit", str(config), *api, "--run-id", "jobs-bad", "--wait")
    assert waited.returncode == 1, waited.stderr
    assert "is not on this machine: the cluster checks it" in waited.stderr  # so submit could not
    assert "no-such-model" in waited.stderr  # the job's own error, streamed from its logs
    assert "job jobs-bad FAILED" in waited.stderr
    assert not atlas.exists()

    again = cli(ray_cluster, "submit", str(config), *api, "--run-id", "jobs-bad")
    assert again.returncode == 2 and "resume it with --resume" in again.stderr

    # The fixed config resumes the run: a new job under the same run id, which scores only what the
    # failed attempt did not stage (here one shard, staged as a dying job would have left it).
    good = write_config(tmp_path / "good.yaml", model=tiny_sources["llama"].path, atlas=str(atlas))
    plan = resolve_job(replace(load_job_config(good), run_id="jobs-bad"))
    claim_staging(str(atlas), run_id="jobs-bad", fingerprint=plan.fingerprint)
    ShardScorer(ScorerSpec.from_plan(plan)).score(plan.shards[0])
    resumed = cli(ray_cluster, "submit", str(good), *api, "--run-id", "jobs-bad", "--resume", "--wait")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "jobs-bad-resume-1"
    meta = run_metadata(str(atlas), "jobs-bad")
    assert meta["shards"] == {"planned": len(plan.shards), "resumed": 1, "computed": len(plan.shards) - 1}
    assert open_neurons(str(atlas)).to_pyarrow_table().num_rows == plan.total_rows

    done = cli(ray_cluster, "submit", str(good), *api, "--run-id", "jobs-bad", "--resume")
    assert done.returncode == 2 and "jobs-bad-resume-1 is SUCCEEDED" in done.stderr
    never = cli(ray_cluster, "submit", str(good), *api, "--run-id", "jobs-never", "--resume")
    assert never.returncode == 2 and "never submitted" in never.stderr
    # A model this machine has is checked before anything is submitted.
    wrong = cli(ray_cluster, "submit", str(good), *api, "--run-id", "jobs-wrong", "--layers", "0,99")
    assert wrong.returncode == 2 and "key 'layers' has value 99" in wrong.stderr
    assert "no job 'jobs-wrong'" in cli(ray_cluster, "status", "jobs-wrong", *api).stderr


def test_a_client_without_the_token_is_refused(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    refused = cli(ray_cluster, "status", "jobs-1", "--address", ray_cluster.jobs_api, env=env)
    assert refused.returncode == 2
    assert "refused" in refused.stderr and "RAY_AUTH_MODE=token" in refused.stderr
