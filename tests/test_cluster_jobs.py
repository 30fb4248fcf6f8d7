"""Ray Jobs on a real two-node Ray cluster on loopback (`ray start --head` plus a worker node, token
authentication on): submit, status, logs, a refused duplicate run id, a failing job, a client
without the token. The CLI runs as a subprocess, as a user runs it."""
from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from cluster.config import load_job_config
from cluster.plan import resolve_job
from cluster.scorer import ScorerSpec, ShardScorer
from storage.read import open_neurons, run_metadata
from storage.staging import claim_staging
from ray_nodes import BIN, RayCluster, two_node_cluster

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


@pytest.fixture(scope="module")
def ray_cluster():
    with two_node_cluster() as cluster:
        yield cluster


def cli(cluster: RayCluster, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "neuron-atlas"), *args], env=env or cluster.env, capture_output=True,
                          text=True, timeout=timeout)


def cli_together(cluster: RayCluster, *commands: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Independent commands started at once, their results in order: each spends seconds of one core on its
    own imports, so the 2 cores run two of them in the time of one."""
    procs = [subprocess.Popen([str(BIN / "neuron-atlas"), *args], env=cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def write_config(path: Path, **values) -> Path:
    data = {"concepts": str(UNSEEN), "layers": [0, 3], "ablation": ["zero", "mean"], "shard_neurons": 40,
            "batch_rows": 32, "cluster": {"actors": 2, "cpus_per_actor": 1},
            "reference_contrast": False, **values}  # the contrast is tested in test_specificity.py
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

    # The finished job read back four ways (read-only, so at once).
    status, text, logs, unknown = cli_together(
        ray_cluster, ["status", "jobs-1", *api, "--format", "json"], ["status", "jobs-1", *api],
        ["logs", "jobs-1", *api], ["status", "no-such-run", *api])
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["status"] == "SUCCEEDED" and state["entrypoint"].startswith("python -m jobs.cli run ")
    assert "SUCCEEDED" in text.stdout
    assert "committed run jobs-1" in logs.stdout
    assert unknown.returncode == 2 and "no job 'no-such-run'" in unknown.stderr

    table = open_neurons(str(atlas)).to_pyarrow_table()
    assert table.num_rows == 2 * 2 * 2 * 96  # concepts x ablations x layers x neurons
    assert pc.all(pc.equal(table["run_id"], "jobs-1")).as_py()
    meta = run_metadata(str(atlas), "jobs-1")
    assert meta["shards"]["computed"] == meta["shards"]["planned"] and meta["device"] == "cpu"
    assert meta["config"]["cluster"]["actors"] == 3 and len(meta["timings"]["actors"]) == 3


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
    # failed attempt did not stage (here one shard, staged as a dying job would have left it). One actor:
    # the resume is under test here, not the pool (a second actor only adds its start-up).
    good = write_config(tmp_path / "good.yaml", model=tiny_sources["llama"].path, atlas=str(atlas),
                        cluster={"actors": 1, "cpus_per_actor": 1})
    plan = resolve_job(replace(load_job_config(good), run_id="jobs-bad"))
    claim_staging(str(atlas), run_id="jobs-bad", fingerprint=plan.fingerprint)
    ShardScorer(ScorerSpec.from_plan(plan)).score(plan.shards[0])
    resumed = cli(ray_cluster, "submit", str(good), *api, "--run-id", "jobs-bad", "--resume", "--wait")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "jobs-bad-resume-1"
    meta = run_metadata(str(atlas), "jobs-bad")
    assert meta["shards"] == {"planned": len(plan.shards), "resumed": 1, "computed": len(plan.shards) - 1}
    assert open_neurons(str(atlas)).to_pyarrow_table().num_rows == plan.total_rows

    # Three submissions that are refused (independent, so at once); the last one because a model this
    # machine has is checked before anything is submitted.
    done, never, wrong = cli_together(
        ray_cluster, ["submit", str(good), *api, "--run-id", "jobs-bad", "--resume"],
        ["submit", str(good), *api, "--run-id", "jobs-never", "--resume"],
        ["submit", str(good), *api, "--run-id", "jobs-wrong", "--layers", "0,99"])
    assert done.returncode == 2 and "jobs-bad-resume-1 is SUCCEEDED" in done.stderr
    assert never.returncode == 2 and "never submitted" in never.stderr
    assert wrong.returncode == 2 and "key 'layers' has value 99" in wrong.stderr
    assert "no job 'jobs-wrong'" in cli(ray_cluster, "status", "jobs-wrong", *api).stderr


def test_a_client_without_the_token_is_refused(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    refused = cli(ray_cluster, "status", "jobs-1", "--address", ray_cluster.jobs_api, env=env)
    assert refused.returncode == 2
    assert "refused" in refused.stderr and "RAY_AUTH_MODE=token" in refused.stderr
