"""Nightly re-attribution without a cluster: cron parsing and fire times, the schedule: section,
fingerprints, deterministic submission ids, the newest checkpoint, and retries with backoff."""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, load_job_config
from cluster.cron import CronError, next_fire, parse_cron, previous_fire
from cluster.schedule import due_jobs, due_time, load_schedule, newest_checkpoint, submit_due, tick

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"
UTC = timezone.utc


def test_cron_fields_ranges_steps_lists_and_names():
    cron = parse_cron("*/15 2-4,22 1,15 JAN-mar mon-FRI")
    assert cron.minutes == {0, 15, 30, 45} and cron.hours == {2, 3, 4, 22}
    assert cron.days == {1, 15} and cron.months == {1, 2, 3} and cron.weekdays == {1, 2, 3, 4, 5}
    assert parse_cron("5/20 * * * 7").minutes == {5, 25, 45} and parse_cron("0 0 * * 7").weekdays == {0}
    assert parse_cron("1-10/3 * * * *").minutes == {1, 4, 7, 10}
    daily, midnight = parse_cron("@daily"), parse_cron("0 0 * * *")
    assert (daily.minutes, daily.hours, daily.days, daily.weekdays) == (midnight.minutes, midnight.hours,
                                                                        midnight.days, midnight.weekdays)
    for bad, words in (("60 * * * *", "minute 60 not in 0..59"), ("* * *", "expected five fields"),
                       ("* * * foo *", "month 'foo' is not a number or a name"), ("*/0 * * * *", "step"),
                       ("5-1 * * * *", "runs backwards"), ("1,,2 * * * *", "empty item")):
        with pytest.raises(CronError, match=words):
            parse_cron(bad)


def _brute_previous(cron, at: datetime, tz: str) -> datetime:
    """Reference: walk back minute by minute in UTC, matching the local time's fields."""
    from zoneinfo import ZoneInfo

    t = at.replace(second=0, microsecond=0)
    while True:
        local = t.astimezone(ZoneInfo(tz))
        if local.minute in cron.minutes and local.hour in cron.hours and cron.matches_date(local.date()):
            return t
        t -= timedelta(minutes=1)


@pytest.mark.parametrize("expression", ["0 2 * * *", "*/7 */5 * * *", "30 1 1,15 * mon", "0 12 * * sat,sun"])
def test_fire_times_equal_a_minute_by_minute_search(expression):
    cron = parse_cron(expression)
    start = datetime(2026, 12, 2, 3, 4, 5, tzinfo=UTC)
    for hours in range(0, 24 * 9, 13):
        at = start + timedelta(hours=hours, minutes=hours % 60)
        for tz in ("UTC", "Asia/Kolkata"):
            previous = previous_fire(cron, at, tz)
            assert previous == _brute_previous(cron, at, tz), (expression, at, tz)
            following = next_fire(cron, previous, tz)
            assert following > at or following == previous_fire(cron, following, tz)
            assert previous_fire(cron, following, tz) == following


def test_dst_and_day_of_month_or_day_of_week():
    cron = parse_cron("30 2 * * *")  # 02:30 Paris does not exist on 2026-03-29: it fires once, at 03:30 CEST
    fire = next_fire(cron, datetime(2026, 3, 28, 12, tzinfo=UTC), "Europe/Paris")
    assert fire == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    fall = next_fire(cron, datetime(2026, 10, 24, 12, tzinfo=UTC), "Europe/Paris")  # 02:30 happens twice: once
    assert fall == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert next_fire(cron, fall, "Europe/Paris") == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)
    either = parse_cron("0 0 13 * fri")  # cron's rule: the 13th OR a Friday
    assert next_fire(either, datetime(2026, 12, 2, tzinfo=UTC)) == datetime(2026, 12, 4, tzinfo=UTC)  # a Friday
    assert next_fire(either, datetime(2026, 12, 11, 1, tzinfo=UTC)) == datetime(2026, 12, 13, tzinfo=UTC)
    assert previous_fire(parse_cron("0 0 30 2 *"), datetime(2026, 12, 2, tzinfo=UTC)) is None  # never fires


def test_missed_nights_give_one_due_time_the_latest(tmp_path):
    config = _config(tmp_path, cron="0 2 * * *", timezone="Europe/Paris")
    job = load_schedule(config)
    # down from Monday night to Thursday noon: one due time, Thursday 02:00 Paris = 01:00 UTC
    assert due_time(job, datetime(2026, 12, 3, 12, tzinfo=UTC)) == datetime(2026, 12, 3, 1, tzinfo=UTC)
    assert due_time(job, datetime(2026, 12, 3, 0, 59, tzinfo=UTC)) == datetime(2026, 12, 2, 1, tzinfo=UTC)


def _config(tmp_path: Path, *, model: str = "unused", name: str = "nightly.yaml", **schedule) -> Path:
    data = {"model": model, "concepts": str(UNSEEN), "atlas": str(tmp_path / "atlas"), "layers": [0, 3],
            "schedule": {"cron": "* * * * *", "address": "http://127.0.0.1:9", **schedule}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_schedule_section_is_validated_with_key_and_file(tmp_path):
    cases = [({"crn": "0 2 * * *"}, "unknown key 'schedule.crn'"),
             ({"cron": "0 25 * * *"}, "key 'schedule.cron': cron '0 25 * * *': hour 25 not in 0..23"),
             ({"cron": "0 2 * * *", "timezone": "Paris"}, "key 'schedule.timezone'"),
             ({"cron": "0 2 * * *", "drift": {"min_spearman": 2}}, "'schedule.drift.min_spearman' has value 2"),
             ({"cron": "0 2 * * *", "drift": {"top": 5}}, "unknown key 'schedule.drift.top'"),
             ({"cron": "0 2 * * *", "retries": -1}, "'schedule.retries' has value -1"),
             ({"cron": "0 2 * * *", "methods": ["nope"]}, "'schedule.methods' has value 'nope'"),
             ({"cron": "0 2 * * *", "name": "Bad Name"}, "'schedule.name' has value 'Bad Name'"),
             ({"timezone": "UTC"}, "missing required key 'schedule.cron'"), ("0 2 * * *", "key 'schedule'")]
    for value, words in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"model": "m", "concepts": "c.yaml", "atlas": "a", "schedule": value}))
        with pytest.raises(ConfigError) as err:
            load_job_config(path)
        assert words in str(err.value) and str(path) in str(err.value), err.value
    path = _config(tmp_path, concepts=["a.yaml", "b.yaml"], drift={"k": 20, "max_churn": 0.25})
    data = yaml.safe_load(path.read_text())
    data["schedule"]["model"] = "ckpt/*"
    path.write_text(yaml.safe_dump(data))
    good = load_job_config(path)
    assert good.schedule.name == "nightly" and good.schedule.model == str(tmp_path / "ckpt" / "*")
    assert good.schedule.concepts == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"))
    assert good.schedule.drift.k == 20 and good.schedule.drift.max_churn == 0.25
    assert load_job_config(_config(tmp_path)).snapshot()["schedule"]["cron"] == "* * * * *"
    with pytest.raises(ConfigError, match="has no 'schedule' section"):
        path = tmp_path / "plain.yaml"
        path.write_text(yaml.safe_dump({"model": "m", "concepts": "c.yaml", "atlas": "a"}))
        load_schedule(path)


def _copy_model(source: str, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_fingerprint_and_submission_id_depend_on_content_not_paths(tiny_sources, tmp_path):
    now = datetime(2026, 12, 2, 2, 0, 30, tzinfo=UTC)
    a, b = tmp_path / "a", tmp_path / "b"
    for side in (a, b):
        _copy_model(tiny_sources["llama"].path, side / "ckpt" / "step-1")
    # b's concept file is the same concepts in another YAML layout, at another path
    (b / "sets").mkdir()
    (b / "sets" / "unseen_concepts.yaml").write_text(yaml.safe_dump(yaml.safe_load(UNSEEN.read_text()), indent=4))
    config_a = load_schedule(_config(a, model="ckpt/step-1"))
    assert due_time(config_a, now) == datetime(2026, 12, 2, 2, 0, tzinfo=UTC)
    job_a = due_jobs(config_a, due_time(config_a, now))[0]
    config_b = _config(b, model="ckpt/step-1")
    data = yaml.safe_load(config_b.read_text())
    data["concepts"] = "sets/unseen_concepts.yaml"
    data["atlas"] = str(a / "atlas")  # the same atlas (another atlas is another run)
    config_b.write_text(yaml.safe_dump(data))
    job_b = due_jobs(load_schedule(config_b), datetime(2026, 12, 2, 2, 0, tzinfo=UTC))[0]
    assert job_a.fingerprint == job_b.fingerprint and job_a.submission_id == job_b.submission_id
    assert job_a.submission_id.startswith("nightly-unseen_concepts-20261202t0200-")
    parts = job_a.fingerprint.components
    assert parts["model"]["revision"].startswith("sha256:") and parts["concepts"]["names"] == ["music", "weather"]
    assert parts["methods"] == ["neat"] and parts["layers"] == [0, 3] and parts["version"]

    later = due_jobs(load_schedule(config_b), datetime(2026, 12, 2, 2, 1, tzinfo=UTC))[0]
    assert later.fingerprint == job_b.fingerprint and later.submission_id != job_b.submission_id
    data["methods"] = ["neat", "atp"]
    config_b.write_text(yaml.safe_dump(data))
    more = due_jobs(load_schedule(config_b), datetime(2026, 12, 2, 2, 0, tzinfo=UTC))[0]
    assert more.fingerprint.id != job_b.fingerprint.id and more.submission_id != job_b.submission_id
    # weights edited in place: a new revision, fingerprint and run id
    weights = b / "ckpt" / "step-1" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(k for k in tensors if "down_proj" in k)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    edited = due_jobs(load_schedule(config_b), datetime(2026, 12, 2, 2, 0, tzinfo=UTC))[0]
    assert edited.model_revision != more.model_revision and edited.fingerprint.id != more.fingerprint.id


def test_newest_checkpoint_is_the_one_written_last(tiny_sources, tmp_path):
    root = tmp_path / "ckpt"
    for step, age in (("step-100", 300), ("step-200", 100), ("step-90", 200)):
        model = _copy_model(tiny_sources["gpt2"].path, root / step)
        stamp = time.time() - age
        os.utime(model / "model.safetensors", (stamp, stamp))
    (root / "notes").mkdir()  # not a model directory: ignored
    assert newest_checkpoint(str(root / "step-*"), source="x") == str(root / "step-200")
    assert newest_checkpoint(str(root), source="x") == str(root / "step-200")  # a directory of checkpoints
    assert newest_checkpoint(str(root / "step-90"), source="x") == str(root / "step-90")  # one model: itself
    assert newest_checkpoint("smollm2-135m", source="x") == "smollm2-135m"
    with pytest.raises(ConfigError, match="no checkpoint directory"):
        newest_checkpoint(str(root / "nothing-*"), source="x")


def test_a_failing_submission_is_retried_with_backoff_then_exits_1(tiny_sources, tmp_path):
    _copy_model(tiny_sources["llama"].path, tmp_path / "ckpt" / "m")
    # port 9 (discard) on loopback: nothing listens, every request is refused
    config = _config(tmp_path, model="ckpt/m", retries=2, retry_seconds=0.5)
    job = due_jobs(load_schedule(config), datetime(2026, 12, 2, 2, 0, tzinfo=UTC))[0]
    waits, log = [], io.StringIO()
    outcome = submit_due(job, log=log, sleep=waits.append)
    assert outcome.action == "failed" and waits == [0.5, 1.0]
    text = log.getvalue()
    assert "attempt 1 of 3" in text and "attempt 2 of 3" in text and "failed after 3 attempts" in text
    out = io.StringIO()
    report = tick([str(config)], now=datetime(2026, 12, 2, 2, 0, 5, tzinfo=UTC), log=io.StringIO(), out=out)
    assert report.exit_status == 1 and json.loads(out.getvalue())["action"] == "failed"
