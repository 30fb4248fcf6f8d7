"""`storage_options` in a job config: parsed as a mapping of strings, never printed, redacted in snapshots."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, load_job_config
from storage.location import REDACTED, _fsspec_options, redact_options, secret_values

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def write(tmp_path: Path, options) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "concepts": "c.yaml", "atlas": "s3://bucket/atlas",
                                    "storage_options": options}))
    return path


def test_storage_options_are_parsed_hidden_and_redacted(tmp_path):
    options = {"AWS_ENDPOINT_URL": "http://user:pw@127.0.0.1:9000", "AWS_REGION": "eu-west-1",
               "AWS_ALLOW_HTTP": True, "max_retries": 2, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": "token-123", "some_new_option": "x"}
    config = load_job_config(write(tmp_path, options))
    assert config.storage_options["AWS_ALLOW_HTTP"] == "true" and config.storage_options["max_retries"] == "2"
    assert config.storage_options["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert SECRET not in repr(config) and "storage_options=" not in repr(config)
    shown = config.snapshot()["storage_options"]
    assert shown == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1", "AWS_ALLOW_HTTP": "true",
                     "max_retries": "2", "AWS_ACCESS_KEY_ID": REDACTED, "AWS_SECRET_ACCESS_KEY": REDACTED,
                     "AWS_SESSION_TOKEN": REDACTED, "some_new_option": REDACTED}
    assert set(secret_values(config.storage_options)) == {"AKIAEXAMPLE", SECRET, "token-123"}


def test_a_config_without_storage_options_keeps_its_snapshot(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "concepts": "c.yaml", "atlas": "atlas"}))
    config = load_job_config(path)
    assert config.storage_options is None and "storage_options" not in config.snapshot()  # default run ids unchanged


@pytest.mark.parametrize("options, message", [
    (["AWS_REGION"], "must be a mapping of option names to strings"),
    ({"AWS_SECRET_ACCESS_KEY": [SECRET]}, "'storage_options.AWS_SECRET_ACCESS_KEY' must be a string, got list"),
])
def test_bad_storage_options_name_the_key_not_the_value(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_job_config(write(tmp_path, options))
    assert SECRET not in str(err.value)


def test_scorer_spec_does_not_print_storage_options():
    from cluster.scorer import ScorerSpec

    spec = ScorerSpec(model=None, concepts=(), ablations=("zero",), run_id="r", atlas="s3://b/a", device="cpu",
                      dtype="float32", threads=1, batch_rows=2, storage_options={"AWS_SECRET_ACCESS_KEY": SECRET})
    assert SECRET not in repr(spec)


def test_s3fs_gets_the_same_options_under_its_own_names():
    options = _fsspec_options("s3", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1",
                                     "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_PROFILE": "lab",
                                     "AWS_ALLOW_HTTP": "true"})
    assert options == {"skip_instance_cache": True, "endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s",
                       "client_kwargs": {"region_name": "eu-west-1"}, "profile": "lab"}
    # delta-rs's retry bound applies to s3fs's botocore client too: 1 retry = 2 attempts
    retried = _fsspec_options("s3", {"max_retries": "1"})
    assert retried["config_kwargs"]["retries"] == {"total_max_attempts": 2, "mode": "standard"}
    with pytest.raises(ValueError, match="storage option max_retries='often': expected a whole number"):
        _fsspec_options("s3", {"max_retries": "often"})
    assert redact_options(None) is None
