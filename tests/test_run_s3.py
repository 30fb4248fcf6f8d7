"""A whole run on local Ray into an atlas on a real S3 API server (moto on 127.0.0.1), with the
endpoint and credentials only in the job config's storage_options: actors stage, the driver commits."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import load_job_config
from cluster.driver import run_job
from cluster.plan import resolve_job
from s3_server import SECRET_KEY, start_moto
from storage.atlas import Atlas
from storage.read import run_metadata
from ray_local import local_ray_session

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


@pytest.fixture(scope="module")
def s3():
    server, handle = start_moto()
    try:
        yield handle
    finally:
        server.stop()


def test_a_run_with_storage_options_in_the_config_lands_on_s3(tmp_path, tiny_sources, s3, monkeypatch):
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
    with local_ray_session():
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
