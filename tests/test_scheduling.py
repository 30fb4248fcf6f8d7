"""Health-aware scheduling and preflight on a real local Ray: a shard that fails on one actor is retried on
another, an actor that dies for good leaves a run that completes on the others with the same atlas, a
shard that kills every actor it lands on fails the run naming it, and a plan the cluster cannot hold
fails in seconds naming what is missing. Faults are injected by scorer subclasses built here (shipped to
the actors by value); everything else is the real driver, Ray and the real atlas."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

import cluster.driver as driver
from cluster.config import load_job_config
from cluster.plan import Shard, resolve_job
from cluster.pool import SHARD_TRIES, ShardQueue
from cluster.preflight import Demand, check_resources
from cluster.scorer import ShardScorer
from storage.read import open_neurons, run_metadata

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"
KEY = ["concept", "ablation", "layer", "neuron"]
BIN = Path(sys.executable).parent


# --- the queue and the resource check: pure -------------------------------------------------------

def shard(layer: int, start: int = 0) -> Shard:
    return Shard("neat", layer, start, start + 4)


def test_a_retried_shard_goes_to_another_ready_actor_and_back_only_when_none_is_left():
    first, second = shard(0), shard(1)
    queue = ShardQueue.of([second], route=lambda s: "full")
    queue.put_back(first, failed_on=0)
    ready = {0, 1}
    others_ready = lambda s, avoid: bool(ready - avoid)  # noqa: E731
    assert queue.take(0, "full", others_ready) == second  # actor 0 skips the shard it failed
    assert queue.take(1, "full", others_ready) == first  # actor 1 takes it
    queue.put_back(first, failed_on=1)
    ready = {1}  # actor 0 is gone: the only actor left takes it again
    assert queue.take(1, "full", others_ready) == first


def test_idle_full_actors_take_late_layer_shards_and_suffix_actors_only_those():
    early, late = shard(0), shard(3)
    route = lambda s: "suffix" if s.layer >= 2 else "full"  # noqa: E731
    queue = ShardQueue.of([early, late], route=route)
    assert queue.take(1, "suffix", lambda s, a: True) == late
    queue = ShardQueue.of([early, late], route=route)
    assert queue.take(0, "full", lambda s, a: True) == early
    assert queue.take(0, "full", lambda s, a: True) == late  # nothing of its own left
    queue = ShardQueue.of([early], route=route)
    assert queue.take(1, "suffix", lambda s, a: True) is None


@pytest.mark.parametrize("demands, nodes, message", [
    ([Demand("full", 1, 1, 4)], [{"CPU": 2}], "needs 4 GPUs per replica (on one node), the cluster has 0 GPUs"),
    ([Demand("full", 3, 2, 0)], [{"CPU": 2}, {"CPU": 3}], "needs 3 full actors x 2 CPUs = 6 CPUs, the cluster has 5 CPUs"),
    ([Demand("full", 1, 4, 0)], [{"CPU": 2}, {"CPU": 3}],
     "needs 4 CPUs per replica (on one node), the largest of its 2 nodes has 3 CPUs (the cluster 5 CPUs)"),
    ([Demand("full", 2, 2, 0)], [{"CPU": 3}, {"CPU": 1}], "cannot hold them all"),
    ([Demand("full", 1, 1, 0, memory=30e9)], [{"CPU": 2, "memory": 8e9}],
     "needs 30.0 GB of memory per replica (on one node), the cluster has 8.0 GB of memory"),
    ([Demand("full", 1, 1, 2), Demand("suffix", 2, 1, 1)], [{"CPU": 8, "GPU": 2}],
     "needs 1 full actors x 2 GPUs + 2 suffix actors x 1 GPU = 4 GPUs, the cluster has 2 GPUs"),
])
def test_the_resource_check_names_what_is_missing(demands, nodes, message):
    assert message in check_resources(demands, nodes)


def test_a_plan_that_fits_passes_the_resource_check():
    assert check_resources([Demand("full", 2, 1, 1), Demand("suffix", 2, 1, 1)],
                           [{"CPU": 2, "GPU": 2}, {"CPU": 2, "GPU": 2}]) is None


# --- real runs on a local Ray of 2 CPUs ----------------------------------------------------------------

def write_config(directory: Path, source, *, atlas: Path, **cluster) -> Path:
    """16 shards of the tiny Llama (24 neurons each, every layer), two actors."""
    path = directory / f"job-{atlas.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": source.path, "concepts": str(UNSEEN), "layers": "all", "atlas": str(atlas), "ablation": "zero",
        "shard_neurons": 24, "batch_rows": 8, "cluster": {"actors": 2, "cpus_per_actor": 1, **cluster},
        "reference_contrast": False}))  # tested in test_specificity.py; here it would only add time
    return path


def atlas_rows(atlas: Path, run_id: str):
    table = open_neurons(str(atlas)).to_pyarrow_table()
    table = table.filter(pc.equal(table["run_id"], run_id))
    return table.drop_columns(["run_id", "created_at"]).sort_by([(k, "ascending") for k in KEY])


def faulty_scorer(fault: str, directory: Path, shard_id: str | None = None):
    """A ShardScorer whose faults are real process events. The first actor to start claims
    `directory/claimed` and is the faulty one ("raise": every shard it scores raises; "cuda": the same
    with a sticky CUDA error; "exit": it exits for good, no restart, at its first shard); "kill": any
    actor scoring `shard_id` dies (Ray restarts it).
    Defined in a function, so Ray ships the class by value."""
    claim = str(directory / "claimed")

    class FaultyScorer(ShardScorer):
        def __init__(self, spec, prepared=None):
            super().__init__(spec, prepared)
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
                self.faulty = True
            except FileExistsError:
                self.faulty = False

        def score(self, shard):
            if fault == "raise" and self.faulty:
                raise RuntimeError("simulated fault of this actor's node")
            if fault == "cuda" and self.faulty:  # its restart does not claim again: a healthy process
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            if fault == "exit" and self.faulty:
                import ray

                ray.actor.exit_actor()
            if fault == "kill" and shard.shard_id == shard_id:
                os._exit(1)
            return super().score(shard)

    return FaultyScorer


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sources, local_ray):
    directory = tmp_path_factory.mktemp("sched")
    atlas = directory / "reference"
    plan = replace(resolve_job(load_job_config(write_config(directory, tiny_sources["llama"], atlas=atlas))),
                   run_id="undisturbed")
    assert len(plan.shards) == 16
    driver.run_job(plan, progress_stream=io.StringIO())
    return atlas_rows(atlas, "undisturbed")


def faulty_run(monkeypatch, tmp_path, tiny_sources, fault: str, run_id: str, **kwargs):
    atlas = tmp_path / "atlas"
    plan = replace(resolve_job(load_job_config(write_config(tmp_path, tiny_sources["llama"], atlas=atlas))),
                   run_id=run_id)
    shard_id = plan.shards[5].shard_id if fault == "kill" else None
    monkeypatch.setattr(driver, "ShardScorer", faulty_scorer(fault, tmp_path, shard_id))
    progress = io.StringIO()
    return plan, atlas, progress, shard_id


def test_shards_that_fail_on_one_actor_succeed_on_another(reference, monkeypatch, tmp_path, tiny_sources):
    plan, atlas, progress, _ = faulty_run(monkeypatch, tmp_path, tiny_sources, "raise", "one-bad-actor")
    driver.run_job(plan, progress_stream=progress)
    lines = progress.getvalue().splitlines()
    failed = [line for line in lines if "failed (try" in line]
    assert failed and all("(try 1 of" in line and "simulated fault of this actor's node" in line for line in failed)
    assert len({line.split(" on actor ")[1].split(":")[1] for line in failed}) == 1  # all on one actor (its pid)
    assert atlas_rows(atlas, "one-bad-actor").equals(reference)
    meta = run_metadata(str(atlas), "one-bad-actor")
    assert meta["shards"]["computed"] == 16


def test_an_actor_dead_for_good_leaves_a_run_that_completes_on_the_others(reference, monkeypatch, tmp_path,
                                                                           tiny_sources):
    plan, atlas, progress, _ = faulty_run(monkeypatch, tmp_path, tiny_sources, "exit", "one-dead-actor")
    driver.run_job(plan, progress_stream=progress)
    text = progress.getvalue()
    assert "is dead for good" in text and "its shards go back to the queue" in text
    assert atlas_rows(atlas, "one-dead-actor").equals(reference)
    actors = run_metadata(str(atlas), "one-dead-actor")["timings"]["actors"]
    assert sorted(entry["shards"] for entry in actors.values()) == [0, 16]  # the survivor scored them all


def test_an_actor_whose_device_broke_is_restarted_and_the_atlas_is_identical(reference, monkeypatch, tmp_path,
                                                                             tiny_sources):
    plan, atlas, progress, _ = faulty_run(monkeypatch, tmp_path, tiny_sources, "cuda", "broken-device")
    driver.run_job(plan, progress_stream=progress)
    text = progress.getvalue()
    assert "its device is broken; restarting it" in text  # its restart may come back after the last shard
    assert atlas_rows(atlas, "broken-device").equals(reference)


def test_a_shard_that_kills_every_actor_it_lands_on_fails_the_run_naming_it(local_ray, monkeypatch, tmp_path,
                                                                            tiny_sources):
    plan, atlas, progress, shard_id = faulty_run(monkeypatch, tmp_path, tiny_sources, "kill", "killer-shard")
    with pytest.raises(driver.RunError, match=rf"shard {shard_id} failed after {SHARD_TRIES} tries"):
        driver.run_job(plan, progress_stream=progress)
    tries = [line for line in progress.getvalue().splitlines() if f"shard {shard_id} failed (try" in line]
    assert len(tries) == SHARD_TRIES - 1
    assert len({line.split(" on actor ")[1].split(":")[1] for line in tries}) == SHARD_TRIES - 1  # another each time
    assert not (atlas / "neurons").exists()  # nothing committed


def test_a_plan_needing_more_cpus_than_the_cluster_has_fails_in_seconds(local_ray, tmp_path, tiny_sources):
    atlas = tmp_path / "atlas"
    plan = resolve_job(load_job_config(write_config(tmp_path, tiny_sources["llama"], atlas=atlas, cpus_per_actor=2)))
    started = time.monotonic()
    with pytest.raises(driver.RunError, match=r"preflight: the plan needs 2 full actors x 2 CPUs = 4 CPUs, "
                                              r"the cluster has 2 CPUs"):
        driver.run_job(plan, progress_stream=io.StringIO())
    assert time.monotonic() - started < 30
    assert not (atlas / "neurons").exists()


def test_the_cli_exits_1_naming_the_missing_gpus(tmp_path, tiny_sources):
    atlas = tmp_path / "atlas"
    config = write_config(tmp_path, tiny_sources["llama"], atlas=atlas, gpus_per_actor=1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([str(BIN / "neuron-atlas"), "run", str(config), "--run-id", "no-gpus"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "needs 1 GPU per replica (on one node), the cluster has 0 GPUs" in done.stderr
    assert done.stdout == ""  # stdout carries only a run's JSON summary
    assert not (atlas / "neurons").exists()


@pytest.mark.parametrize("cluster, message", [
    ({"ship_code": "no"}, "key 'cluster.ship_code' has value 'no': expected true or false"),
    ({"placement_timeout_s": 0}, "key 'cluster.placement_timeout_s' has value 0: expected a number > 0"),
    ({"entrypoint_resources": {"driver": "one"}}, "key 'cluster.entrypoint_resources' has value"),
])
def test_bad_cluster_keys_name_the_key(tmp_path, cluster, message):
    from cluster.config import ConfigError

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "concepts": "c.yaml", "atlas": "a", "cluster": cluster}))
    with pytest.raises(ConfigError, match=message):
        load_job_config(path)


def test_entrypoint_flags_become_ray_entrypoint_options(tmp_path):
    from cluster.config import ConfigError
    from cluster.submit import entrypoint_options, with_entrypoint

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "concepts": "c.yaml", "atlas": "a",
                                    "cluster": {"entrypoint_resources": {"driver": 1}}}))
    config = with_entrypoint(load_job_config(path), num_cpus=1, memory_gb=2.5, resources=["gpu_host=0.5"])
    assert entrypoint_options(config) == {"entrypoint_num_cpus": 1, "entrypoint_memory": 2_500_000_000,
                                          "entrypoint_resources": {"driver": 1.0, "gpu_host": 0.5}}
    with pytest.raises(ConfigError, match="has value 'driver': expected NAME=AMOUNT"):
        with_entrypoint(config, resources=["driver"])


def test_submit_retries_while_the_job_agent_starts_and_gives_up_after_its_wait():
    from cluster.submit import SubmitError, _until_agent

    answers = [SubmitError("early: the Ray cluster at http://h:8265 answered: Request failed with status code 500: "
                           "No available agent to submit job, please try again later.."),
               SubmitError("cannot reach the Ray Jobs API at http://h:8265: Connection refused")]

    def send():
        if answers:
            raise answers.pop(0)
        return "submitted"

    progress = io.StringIO()
    _until_agent(send, "http://h:8265", progress, wait=10)
    assert not answers and progress.getvalue().count("waiting for the job agent") == 2

    def never():
        raise SubmitError("cannot reach the Ray Jobs API at http://h:8265: Connection refused")

    started = time.monotonic()
    with pytest.raises(SubmitError, match="waited [0-9]+ s for the head's job agent"):
        _until_agent(never, "http://h:8265", None, wait=1.2)
    assert time.monotonic() - started < 5
    with pytest.raises(SubmitError, match="refused"):  # other errors are not retried
        _until_agent(lambda: (_ for _ in ()).throw(SubmitError("the Ray cluster refused the request")), "h", None)
