"""A run against a real two-node Ray cluster on loopback (`ray start --head` plus a worker node, token
authentication on), driven by `neuron-atlas run` with cluster.address, as a user runs it: a plan needing
more CPUs than the cluster has fails in seconds naming them; a run whose worker node is lost for good
(its actor with it) completes on the head's actors, the project's code shipped to the nodes."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from storage.read import open_neurons, run_metadata
from ray_nodes import BIN, http_json, kill_node, two_node_cluster

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


@pytest.fixture()
def two_nodes():
    """A head (2 CPUs) and a worker node (1 CPU, a custom resource "driver"), returned as soon as the
    head's Jobs API answers: its job agent and the worker node may still be starting."""
    with two_node_cluster(worker_resources={"driver": 1}, wait_for_worker=False) as cluster:
        yield cluster


def _job(jobs_api: str, token: str, submission_id: str) -> dict:
    return http_json(f"{jobs_api}/api/jobs/{submission_id}", token)


def _node_with(jobs_api: str, token: str, resource: str) -> str:
    nodes = http_json(f"{jobs_api}/api/v0/nodes", token)["data"]["result"]["result"]
    return next(n["node_id"] for n in nodes if resource in (n.get("resources_total") or {}))


def write_config(path: Path, address: str, source, atlas: Path, **cluster) -> Path:
    """Every layer of the tiny Llama in 2-neuron shards (192 of them, a few seconds): long enough to lose
    a node in the middle (8-neuron shards all finished within a second, before the kill)."""
    path.write_text(yaml.safe_dump({
        "model": source.path, "concepts": str(UNSEEN), "layers": "all", "atlas": str(atlas), "ablation": "zero",
        "shard_neurons": 2, "batch_rows": 2, "cluster": {"address": address, "cpus_per_actor": 1, **cluster}}))
    return path


def staged(atlas: Path, run_id: str) -> int:
    return len(list((atlas / "_staging" / run_id).glob("*.parquet")))


def test_a_two_node_run_fails_fast_on_missing_cpus_and_outlives_a_lost_node(two_nodes, tiny_sources, tmp_path):
    address, jobs_api, token, env, worker = two_nodes.gcs, two_nodes.jobs_api, two_nodes.token, two_nodes.env, two_nodes.worker
    atlas = tmp_path / "atlas"

    # Submitted right after `ray start`: submit waits for the head's job agent if it is not up yet
    # (it printed "waiting for the job agent" on a loaded machine; with the machine busy the agent took
    # over 60 s, the default wait, so the test allows 240 s). The driver asks for the resource
    # only the worker node has, so Ray runs it there, off the head, once that node has joined.
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({
        "model": tiny_sources["llama"].path, "concepts": str(UNSEEN), "layers": [0], "atlas": str(tmp_path / "small"),
        "shard_neurons": 96, "batch_rows": 32, "cluster": {"actors": 1, "cpus_per_actor": 1},
        "reference_contrast": False}))  # the contrast: test_specificity.py (and the lost-node run below)
    submitted = subprocess.run([str(BIN / "neuron-atlas"), "submit", str(small), "--address", jobs_api, "--run-id",
                                "early", "--entrypoint-resource", "driver=1", "--wait"],
                               env={**env, "NEURON_ATLAS_AGENT_WAIT": "240"}, capture_output=True,
                               text=True, timeout=480)
    assert submitted.returncode == 0, submitted.stderr
    assert _job(jobs_api, token, "early")["driver_node_id"] == _node_with(jobs_api, token, "driver")
    assert open_neurons(str(tmp_path / "small")).to_pyarrow_table().num_rows == 2 * 96

    too_big = write_config(tmp_path / "big.yaml", address, tiny_sources["llama"], atlas, actors=4)
    started = time.monotonic()
    refused = subprocess.run([str(BIN / "neuron-atlas"), "run", str(too_big), "--run-id", "too-big"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stderr
    assert "needs 4 full actors x 1 CPU = 4 CPUs, the cluster has 3 CPUs" in refused.stderr
    assert time.monotonic() - started < 60 and refused.stdout == ""

    config = write_config(tmp_path / "job.yaml", address, tiny_sources["llama"], atlas, actors=3)
    run = subprocess.Popen([str(BIN / "neuron-atlas"), "run", str(config), "--run-id", "lost-node"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while staged(atlas, "lost-node") < 3:
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() is not None else "slow"
            time.sleep(0.1)
        kill_node(worker, two_nodes.worker_temp_dir)  # the worker node and its actor, gone for good
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stderr
    summary = json.loads(stdout)  # stdout carries only the summary, Ray's messages went to stderr
    assert summary["rows"] == 2 * 4 * 96 and summary["shards"] > 20
    assert "preflight: 2 nodes have the model and can write the staging area; they run the code shipped" in stderr
    # The node is lost while shards are scored (the pool requeues them) or, on a fast run, during the
    # reference-contrast step that follows (its concepts go to the other actors): the run completes.
    assert "its shards go back to the queue" in stderr or "its concepts go to the 2 other actor(s)" in stderr, stderr
    assert open_neurons(str(atlas)).to_pyarrow_table().num_rows == summary["rows"]
    assert run_metadata(str(atlas), "lost-node")["shards"]["computed"] == summary["shards"]
