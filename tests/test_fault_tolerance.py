"""Runs survive what clusters do to them, with real processes killed: an actor killed mid-run is
restarted and its shards retried; a driver killed mid-run resumes with the same run id, computing only
the unfinished shards and committing once; a shard that keeps failing fails the run after a bounded
number of tries. Every finished atlas is compared row by row with an undisturbed run's."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pyarrow.compute as pc
import pytest
import yaml

from cluster.config import load_job_config
from cluster.driver import SHARD_TRIES, RunError, run_job, todo_shards
from cluster.plan import Shard, resolve_job
from storage.read import list_runs, open_neurons, run_metadata

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"
KEY = ["concept", "ablation", "layer", "neuron"]
BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("local_ray")


def write_config(directory: Path, source, *, atlas: Path, actors: int = 2) -> Path:
    """96 small shards (4 neurons each, every layer of the tiny Llama): a run takes a few seconds,
    long enough to kill something in the middle of it."""
    path = directory / f"job-{atlas.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": source.path, "concepts": str(UNSEEN), "layers": "all", "atlas": str(atlas), "ablation": "zero",
        "shard_neurons": 4, "batch_rows": 8, "cluster": {"actors": actors, "cpus_per_actor": 1},
        "reference_contrast": False}))  # tested in test_specificity.py; here it would only add time
    return path


def atlas_rows(atlas: Path, run_id: str):
    table = open_neurons(str(atlas)).to_pyarrow_table()
    table = table.filter(pc.equal(table["run_id"], run_id))
    return table.drop_columns(["run_id", "created_at"]).sort_by([(k, "ascending") for k in KEY])


def staged_count(atlas: Path, run_id: str) -> int:
    return len(list((atlas / "_staging" / run_id).glob("*.parquet")))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()[:1])
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def scorer_processes(processes) -> list[psutil.Process]:
    """ShardScorer actor processes (Ray titles them ray::ShardScorer...) among `processes`."""
    return [process for process in processes if title(process).startswith("ray::ShardScorer")]


def process_group(pgid: int) -> list[psutil.Process]:
    group = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                group.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return group


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sources):
    """The undisturbed run: (config directory, its atlas rows)."""
    directory = tmp_path_factory.mktemp("ft")
    atlas = directory / "reference"
    plan = resolve_job(load_job_config(write_config(directory, tiny_sources["llama"], atlas=atlas)))
    plan = replace(plan, run_id="undisturbed")
    assert len(plan.shards) == 96
    run_job(plan)
    return directory, atlas_rows(atlas, "undisturbed")


def test_an_actor_killed_mid_run_is_restarted_and_the_atlas_is_identical(reference, tiny_sources, tmp_path):
    atlas = tmp_path / "atlas"
    plan = resolve_job(load_job_config(write_config(tmp_path, tiny_sources["llama"], atlas=atlas)))
    plan = replace(plan, run_id="actor-killed")
    outcome: dict = {}

    def drive() -> None:
        try:
            outcome["summary"] = run_job(plan, progress_stream=io.StringIO())
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    driver = threading.Thread(target=drive)
    driver.start()
    me = psutil.Process()
    wait_for(lambda: staged_count(atlas, "actor-killed") >= 1 and len(scorer_processes(me.children(recursive=True))) == 2,
             60, "the first staged shard")
    victim = scorer_processes(me.children(recursive=True))[0]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = staged_count(atlas, "actor-killed")
    driver.join(180)
    assert not driver.is_alive() and "error" not in outcome, outcome.get("error")
    assert killed_at < len(plan.shards)

    meta = run_metadata(str(atlas), "actor-killed")
    assert meta["shards"] == {"planned": 96, "resumed": 0, "computed": 96}
    actors = meta["timings"]["actors"]
    original = {name for name, entry in actors.items() if "load_seconds" in entry}
    assert any(name.endswith(f":{victim.pid}") for name in original)
    # Its unfinished shards went back to the queue (the other actor, or its restart, scored them).
    assert sum(entry["shards"] for entry in actors.values()) == 96
    assert meta["timings"]["scheduling"]["overhead_seconds"] > 0  # the restart is overhead
    assert atlas_rows(atlas, "actor-killed").equals(reference[1])


def test_a_driver_killed_mid_run_resumes_only_unfinished_shards_and_commits_once(reference, tiny_sources, tmp_path):
    atlas = tmp_path / "atlas"
    # One actor: what is killed is the driver (its local Ray and actor die with it); each of the two runs
    # then starts one torch process instead of two.
    config = write_config(tmp_path, tiny_sources["llama"], atlas=atlas, actors=1)
    command = [str(BIN / "neuron-atlas"), "run", str(config), "--run-id", "driver-killed"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    # Its own session: the local Ray cluster it starts is in its process group, and nothing else is.
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: staged_count(atlas, "driver-killed") >= 5 or first.poll() is not None, 120, "5 staged shards")
        assert first.poll() is None, first.stderr.read()
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        # Its Ray processes die with it (kernel fate sharing): no actor goes on writing shards. Only
        # Ray's two per-node agents linger (see the finally below).
        agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
        wait_for(lambda: all(title(p).startswith(agents) for p in process_group(first.pid) if title(p)),
                 30, "the killed run's Ray processes to exit")

        plan = resolve_job(load_job_config(config))
        todo, done = todo_shards(replace(plan, run_id="driver-killed"))
        assert 5 <= done < len(plan.shards) and len(todo) == len(plan.shards) - done

        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
        assert second.returncode == 0, second.stderr
        summary = json.loads(second.stdout)
        assert summary["shards_resumed"] == done
        assert run_metadata(str(atlas), "driver-killed")["shards"] == {
            "planned": len(plan.shards), "resumed": done, "computed": len(plan.shards) - done}
        runs = list_runs(str(atlas))
        assert runs["run_id"].to_pylist().count("driver-killed") == 1
        assert open_neurons(str(atlas)).version() == summary["version"]
        assert not (atlas / "_staging" / "driver-killed").exists() or staged_count(atlas, "driver-killed") == 0
        assert atlas_rows(atlas, "driver-killed").equals(reference[1])
    finally:
        # Ray's per-node agents of the killed cluster notice their raylet is gone and exit on their own
        # within about a minute; they hold no resources the next run needs. Stop them now, by group.
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_shard_that_keeps_failing_fails_the_run_after_bounded_tries(tiny_sources, tmp_path):
    atlas = tmp_path / "atlas"
    plan = resolve_job(load_job_config(write_config(tmp_path, tiny_sources["llama"], atlas=atlas)))
    one_actor = replace(plan.config, cluster=replace(plan.config.cluster, actors=1))
    broken = replace(plan, config=one_actor, run_id="broken",
                     shards=plan.shards[:1] + (Shard("neat", 0, 90, 200),))  # past the 96 neurons of a layer
    progress = io.StringIO()
    with pytest.raises(RunError, match=rf"shard neat-L000-n000090-000200 failed after {SHARD_TRIES} tries"):
        run_job(broken, progress_stream=progress)
    tries = [line for line in progress.getvalue().splitlines() if "neat-L000-n000090-000200 failed (try" in line]
    assert len(tries) == SHARD_TRIES - 1  # retried, then given up
    assert not (atlas / "neurons").exists()  # nothing committed
