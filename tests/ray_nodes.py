"""Real Ray clusters on loopback for the tests that submit jobs or lose a node: a head (2 CPUs,
dashboard and Jobs API on 127.0.0.1) and a worker node (1 CPU), started with `ray start --block`,
token authentication on as Ray 2.60 sets it up (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on every node
and every client). Every port is a free one: on a shared machine another Ray may hold the defaults
(a head whose job agent cannot bind its port accepts no jobs). Only the processes started here are
stopped, by process group. A plain module: `conftest` names clash across folders.
"""
from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
# Ray gives a starting node 30 s to register; a head and a worker on a shared 2-core machine can take
# minutes to come up, so a start is tried up to START_TRIES times within START_SECONDS each.
START_SECONDS = 300
START_TRIES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    gcs: str  # 127.0.0.1:PORT
    jobs_api: str  # http://127.0.0.1:PORT
    token: str
    env: dict  # what a client needs: RAY_AUTH_MODE=token and the token, the venv's bin on PATH
    head: subprocess.Popen
    worker: subprocess.Popen
    worker_temp_dir: str  # the worker node's own --temp-dir: every process of that node names it


def kill_node(process: subprocess.Popen, temp_dir: str) -> None:
    """Lose a node for good, at once: SIGKILL every descendant of its `ray start --block` process (the
    raylet, and the actors it spawned), its process group, and every process whose command line names
    the node's temp dir. Ray's worker processes (the actors) run in process groups of their own and
    retitle themselves (`ray::ShardScorer`, so their command line no longer names the temp dir); they
    can outlive a group kill for seconds and keep answering the driver over their direct connection,
    so a fast run could finish on an actor that was meant to be dead. Descendants are listed first:
    once the raylet dies, its children are re-parented and can no longer be found that way."""
    import psutil

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            child.kill()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)


def client_env(token: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    return env


def _request(url: str, token: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})


def http_json(url: str, token: str, timeout: float = 10):
    with urllib.request.urlopen(_request(url, token), timeout=timeout) as response:
        return json.load(response)


def http_post(url: str, token: str, timeout: float = 10):
    """POST with an empty body (e.g. the Jobs API's /api/jobs/ID/stop); the JSON answer."""
    request = _request(url, token)
    request.method, request.data = "POST", b""
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def http_ok(url: str, token: str) -> bool:
    try:
        with urllib.request.urlopen(_request(url, token), timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def alive_nodes(jobs_api: str, token: str) -> int:
    try:
        nodes = http_json(f"{jobs_api}/api/v0/nodes", token, timeout=5)["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return 0
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


def stop(process: subprocess.Popen, timeout: float = 40) -> None:
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


def _start(temp_dir: str, env: dict, token: str, processes: list, *, worker_resources: dict | None,
           wait_for_worker: bool) -> RayCluster:
    port, dashboard_port = free_port(), free_port()
    jobs_api = f"http://127.0.0.1:{dashboard_port}"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(80 * 1024**2),
              "--disable-usage-stats"]

    def start(args: list[str], log: str) -> subprocess.Popen:
        process = subprocess.Popen([str(BIN / "ray"), "start", *args, *common], env=env, start_new_session=True,
                                   stdout=open(Path(temp_dir) / log, "w"), stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    def log(name: str) -> str:
        return (Path(temp_dir) / name).read_text()[-3000:]

    head = start(["--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                  "--dashboard-port", str(dashboard_port), "--dashboard-agent-listen-port", str(free_port()),
                  "--ray-client-server-port", str(free_port()), "--num-cpus", "2", "--temp-dir", temp_dir],
                 "head.log")
    deadline = time.monotonic() + START_SECONDS
    # The Jobs API answers: the head's job agent may still be starting ("No available agent").
    while not http_ok(f"{jobs_api}/api/version", token):
        assert head.poll() is None and time.monotonic() < deadline, log("head.log")
        time.sleep(0.2)
    # Its own temp dir: on one machine two nodes sharing one would also share the runtime-env folders,
    # and one node's set-up of the job's working directory would pull it from under the other.
    extra = ["--resources", json.dumps(worker_resources)] if worker_resources else []
    worker_temp_dir = str(Path(temp_dir) / "w")
    worker = start(["--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--temp-dir", worker_temp_dir,
                    "--dashboard-agent-listen-port", str(free_port()), *extra], "worker.log")
    while wait_for_worker and alive_nodes(jobs_api, token) < 2:
        assert head.poll() is None, log("head.log")
        assert worker.poll() is None and time.monotonic() < deadline, log("worker.log")
        time.sleep(0.5)
    return RayCluster(gcs=f"127.0.0.1:{port}", jobs_api=jobs_api, token=token, env=env, head=head, worker=worker,
                      worker_temp_dir=worker_temp_dir)


@contextlib.contextmanager
def two_node_cluster(*, worker_resources: dict | None = None, wait_for_worker: bool = True):
    """A head and a worker node; with wait_for_worker=False it is handed over as soon as the head's
    Jobs API answers (its job agent and the worker node may still be starting)."""
    token = secrets.token_hex(16)
    env = client_env(token)
    for attempt in range(START_TRIES):
        temp_dir = tempfile.mkdtemp(prefix="na-ray-", dir="/tmp")  # short: Unix socket paths are limited
        processes: list[subprocess.Popen] = []
        try:
            try:
                cluster = _start(temp_dir, env, token, processes, worker_resources=worker_resources,
                                 wait_for_worker=wait_for_worker)
            except AssertionError:
                if attempt == START_TRIES - 1:
                    raise
                continue
            yield cluster
            return
        finally:
            for process in reversed(processes):  # the worker first, while the head can still drain it
                stop(process)
            shutil.rmtree(temp_dir, ignore_errors=True)
