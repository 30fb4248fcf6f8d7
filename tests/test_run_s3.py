"""A whole run on local Ray into an atlas on a real S3 API server (moto on 127.0.0.1), with the
endpoint and credentials only in the job config's storage_options: actors stage, the driver commits."""
from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from cluster.config import load_job_config
from cluster.driver import run_job
from cluster.plan import resolve_job
from s3_server import SECRET_KEY, start_moto
from storage.atlas import Atlas
from storage.read import run_metadata

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


@pytest.fixture(scope="module")
def s3():
    server, handle = start_moto()
    try:
        yield handle
    finally:
        server.stop()


def test_a_run_with_storage_options_in_the_config_lands_on_s3(local_ray, tmp_path, tiny_sources, s3, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)  # only the config knows where and who
    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/atlas"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "model": tiny_sources["gpt2"].path, "concepts": str(UNSEEN), "layers": [1], "atlas": uri,
        "run_id": "s3-run", "shard_neurons": 64, "batch_rows": 32, "cluster": {"actors": 1, "cpus_per_actor": 1},
        "storage_options": s3.storage_options,
    }))
    plan = resolve_job(load_job_config(path))
    summary = run_job(plan)
    assert summary.version == 1 and summary.rows == 2 * 128, summary
    assert s3.keys(bucket, "atlas/_staging/") == []  # staged by the actors, removed after the commit
    atlas = Atlas.open(uri, s3.storage_options)
    assert atlas.top("weather", 3).column("rank").to_pylist() == [1, 2, 3]
    assert atlas.history().column("run_id").to_pylist()[0] == "s3-run"
    meta = run_metadata(uri, "s3-run", s3.storage_options)
    assert meta["config"]["storage_options"]["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
    assert meta["config"]["storage_options"]["AWS_ENDPOINT_URL"] == s3.endpoint
    for key in s3.keys(bucket, "atlas/"):
        if "_delta_log" in key:
            assert SECRET_KEY.encode() not in s3.read(bucket, key), key


def test_a_run_whose_s3_server_goes_away_fails_and_resumes_when_it_returns(local_ray, tmp_path, tiny_sources,
                                                                           monkeypatch):
    """SeaweedFS (a real object store that keeps its data on disk) is killed while the actors stage
    shards: the run fails naming a shard, the atlas reads at its previous version once the server is
    back, and the same run id then computes only the shards that were not staged, and commits once."""
    import threading
    import time

    from cluster.driver import RunError
    from s3_server import WeedProcess
    from storage.read import list_runs, open_neurons

    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "weed").mkdir()
    weed = WeedProcess(str(tmp_path / "weed")).start()
    try:
        weed.s3.client().create_bucket(Bucket="atlas")
        uri = "s3://atlas/atlas"
        # Few retries: a refused connection then fails a shard in seconds instead of minutes.
        options = {**weed.s3.storage_options, "max_retries": "1", "retry_timeout": "2s"}

        def plan_for(run_id: str, *, local: bool = False, **extra):
            path = tmp_path / f"{run_id}{'-local' if local else ''}.yaml"
            where = {"atlas": str(tmp_path / "undisturbed")} if local else {"atlas": uri, "storage_options": options}
            path.write_text(yaml.safe_dump({
                "model": tiny_sources["llama"].path, "concepts": str(UNSEEN), "run_id": run_id,
                "ablation": "zero", "batch_rows": 8, "cluster": {"actors": 2, "cpus_per_actor": 1},
                "reference_contrast": False, **where, **extra}))  # the contrast: test_specificity.py
            return resolve_job(load_job_config(path))

        def staged(run_id: str) -> int:
            listing = weed.s3.client().list_objects_v2(Bucket="atlas", Prefix=f"atlas/_staging/{run_id}/")
            return sum(key["Key"].endswith(".parquet") for key in listing.get("Contents", []))

        # The runs that only set the scene (the atlas's version before the outage, the undisturbed rows)
        # have one actor: 1 or 2 actors give identical rows (test_run.py); a second only adds its start-up.
        one_actor = {"cluster": {"actors": 1, "cpus_per_actor": 1}}
        assert run_job(plan_for("before", layers=[1], shard_neurons=64, **one_actor)).version == 1
        plan = plan_for("cut-off", layers="all", shard_neurons=8)  # 48 small shards
        failure = {}

        def run() -> None:
            try:
                run_job(plan)
            except Exception as err:  # what the CLI turns into exit status 1
                failure["error"] = err

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 120
        while staged("cut-off") < 10:
            assert runner.is_alive() and time.monotonic() < deadline, failure
            time.sleep(0.05)
        weed.stop()
        stopped = time.monotonic()
        runner.join(timeout=300)
        assert not runner.is_alive()
        assert isinstance(failure.get("error"), RunError) and "shard " in str(failure["error"]), failure
        assert time.monotonic() - stopped < 60  # max_retries bounds s3fs's botocore as well (8 s here)

        weed.start()  # same data directory: what was acknowledged is there again
        assert open_neurons(uri, options).version() == 1
        assert list_runs(uri, options).column("run_id").to_pylist() == ["before"]
        done = staged("cut-off")
        assert 10 <= done < len(plan.shards)
        summary = run_job(plan)
        # The same plan, undisturbed, into a local atlas: the resumed run's rows must equal its rows.
        undisturbed = plan_for("cut-off", local=True, layers="all", shard_neurons=8, **one_actor)
        assert undisturbed.shards == plan.shards
        run_job(undisturbed)
        key = ["concept", "ablation", "layer", "neuron"]
        values = key + ["score", "effect", "rank", "method"]
        resumed = open_neurons(uri, options).to_pyarrow_table()
        resumed = resumed.filter(pc.equal(resumed["run_id"], "cut-off")).select(values).sort_by([(k, "ascending") for k in key])
        expected = open_neurons(str(tmp_path / "undisturbed")).to_pyarrow_table().select(values)
        expected = expected.sort_by([(k, "ascending") for k in key])
        assert resumed.num_rows == expected.num_rows == 2 * 4 * 96
        assert resumed.equals(expected)  # scores by concept, layer and neuron, bit for bit, and their ranks
        meta = run_metadata(uri, "cut-off", options)
        assert summary.version == 2 and meta["shards"]["resumed"] == done
        assert meta["shards"]["computed"] == len(plan.shards) - done
        assert list_runs(uri, options).column("run_id").to_pylist().count("cut-off") == 1
    finally:
        weed.stop()
