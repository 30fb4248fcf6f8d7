"""`neuron-atlas schedule` against a real two-node Ray cluster (token auth, Jobs API on loopback; the
head of tests/test_cluster_jobs.py): a scheduler killed and restarted between ticks, two schedulers at
once and a missed stretch submit each due run exactly once; an unchanged model is skipped with its
reason; weights edited in place are re-run and the run's drift is stored and shown."""
from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from storage.read import run_metadata
from ray_nodes import BIN, http_json, http_post, two_node_cluster

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


@pytest.fixture(scope="module")
def ray_cluster():
    with two_node_cluster() as cluster:
        yield cluster


def _config(path: Path, *, model: str, atlas: Path, address: str, **schedule) -> Path:
    data = {"model": model, "concepts": str(UNSEEN), "atlas": str(atlas), "layers": [3], "shard_neurons": 96,
            "batch_rows": 32, "cluster": {"actors": 1, "cpus_per_actor": 1},
            "reference_contrast": False,  # tested in test_specificity.py; here it would only add time
            "schedule": {"cron": "* * * * *", "address": address, "retries": 2, "retry_seconds": 1, **schedule}}
    path.write_text(yaml.safe_dump(data))
    return path


def _schedule(cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "neuron-atlas"), "schedule", *args], env=cluster.env, capture_output=True,
                          text=True, timeout=timeout)


def _outcomes(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _stop(cluster, submission_id: str) -> None:
    """Stop a submitted job: only the submissions are under test, and a job left running would take the
    2 cores from the schedulers under test (its driver and actor load torch and the model)."""
    http_post(f"{cluster.jobs_api}/api/jobs/{submission_id}/stop", cluster.token)


def _jobs(cluster, label_prefix: str) -> dict[str, list[str]]:
    """scheduled_for -> submission ids of this schedule's jobs on the cluster (any still PENDING or RUNNING
    is stopped). Read from the Jobs API's REST endpoint with the cluster's token, not with Ray's
    JobSubmissionClient: Ray caches the first authentication token a process loads, so a client in the
    pytest process would keep the token of whichever test cluster came first ("invalid authentication
    token"), and a process of its own costs seconds of imports."""
    found: dict[str, list[str]] = {}
    for job in http_json(f"{cluster.jobs_api}/api/jobs/", cluster.token):
        meta = job.get("metadata") or {}
        if meta.get("neuron_atlas_schedule", "").startswith(label_prefix):
            found.setdefault(meta["neuron_atlas_scheduled_for"], []).append(job["submission_id"])
            if job["status"] in ("PENDING", "RUNNING"):
                _stop(cluster, job["submission_id"])
    return found


def test_restarted_concurrent_and_late_schedulers_submit_each_due_run_once(ray_cluster, tiny_sources, tmp_path):
    config = _config(tmp_path / "minutely.yaml", model=tiny_sources["llama"].path, atlas=tmp_path / "atlas",
                     address=ray_cluster.jobs_api)
    # A long-running scheduler whose clock starts at 02:00:52: it submits 02:00 at once and 02:01 when
    # its clock gets there; then it is killed (SIGKILL: nothing to clean up, no state file).
    lines: queue.Queue = queue.Queue()
    first = subprocess.Popen([str(BIN / "neuron-atlas"), "schedule", str(config), "--now", "2026-12-02T02:00:52Z",
                              "--force"], env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, start_new_session=True)
    threading.Thread(target=lambda: [lines.put(line) for line in first.stdout], daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 300
        while len([o for o in seen if o["action"] == "submitted"]) < 2:
            assert time.monotonic() < deadline and first.poll() is None, seen
            try:
                outcomes = _outcomes(lines.get(timeout=5))
            except queue.Empty:
                continue
            seen += outcomes
            for outcome in outcomes:
                if outcome["action"] == "submitted":
                    _stop(ray_cluster, outcome["submission_id"])  # at once: its run would slow the next tick
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert [o["scheduled_for"] for o in seen] == ["2026-12-02T02:00:00Z", "2026-12-02T02:01:00Z"]

    # Restarted before the next fire time: 02:01 is due again, and found submitted.
    restarted = _schedule(ray_cluster, str(config), "--once", "--now", "2026-12-02T02:01:40Z", "--force")
    assert restarted.returncode == 0, restarted.stderr
    [again] = _outcomes(restarted.stdout)
    assert again["action"] == "already-submitted" and again["submission_id"] == seen[1]["submission_id"]

    # Two schedulers fire the same tick at once: one submits, the other finds it submitted.
    both = [subprocess.Popen([str(BIN / "neuron-atlas"), "schedule", str(config), "--once", "--now",
                              "2026-12-02T02:02:05Z", "--force"], env=ray_cluster.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in both]
    assert [p.returncode for p in both] == [0, 0], [r[1] for r in results]
    actions = sorted(_outcomes(out)[0]["action"] for out, _ in results)
    assert actions == ["already-submitted", "submitted"], results
    _jobs(ray_cluster, "minutely/")

    # Down from 02:02 to 02:07:30: the missed minutes are not caught up one by one, only 02:07 runs.
    late = _schedule(ray_cluster, str(config), "--once", "--now", "2026-12-02T02:07:30Z", "--force")
    assert late.returncode == 0, late.stderr
    assert [o["scheduled_for"] for o in _outcomes(late.stdout)] == ["2026-12-02T02:07:00Z"]

    jobs = _jobs(ray_cluster, "minutely/")
    assert {t: len(ids) for t, ids in jobs.items()} == {
        "2026-12-02T02:00:00Z": 1, "2026-12-02T02:01:00Z": 1, "2026-12-02T02:02:00Z": 1, "2026-12-02T02:07:00Z": 1}


def _edit_weights(model_dir: Path) -> None:
    """Fine-tuning in place: noise on every MLP output projection, same file, same name."""
    import torch

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(7)
    for name in tensors:
        if "down_proj" in name:
            tensors[name] = tensors[name] + 0.5 * tensors[name].std() * torch.randn(tensors[name].shape,
                                                                                      generator=generator)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unchanged_model_is_skipped_and_edited_weights_rerun_with_drift(ray_cluster, tiny_sources, tmp_path):
    import shutil

    model = Path(shutil.copytree(tiny_sources["llama"].path, tmp_path / "ckpt" / "step-1"))
    atlas = tmp_path / "atlas"
    config = _config(tmp_path / "nightly.yaml", model="ckpt/*", atlas=atlas, address=ray_cluster.jobs_api,
                     drift={"k": 20, "min_spearman": 0.9999})

    first = _schedule(ray_cluster, str(config), "--once", "--wait", "--now", "2026-12-02T04:00:30Z")
    assert first.returncode == 0, first.stderr
    [ran] = _outcomes(first.stdout)
    assert ran["action"] == "submitted" and ran["status"] == "SUCCEEDED" and ran["model"] == "step-1"
    meta = run_metadata(str(atlas), ran["submission_id"])
    # the driver's fingerprint is the scheduler's: same weights hash, concepts, methods, version
    assert meta["fingerprint"]["id"] == ran["fingerprint"] and meta["fingerprint"]["family"] == "nightly"
    assert meta["schedule"]["scheduled_for"] == "2026-12-02T04:00:00Z"

    unchanged = _schedule(ray_cluster, str(config), "--once", "--now", "2026-12-02T04:01:30Z")
    assert unchanged.returncode == 0, unchanged.stderr
    [skipped] = _outcomes(unchanged.stdout)
    assert skipped["action"] == "skipped" and skipped["fingerprint"] == ran["fingerprint"]
    assert f"equals that of run {ran['submission_id']}" in unchanged.stderr and "skipped" in unchanged.stderr

    _edit_weights(model)
    edited = _schedule(ray_cluster, str(config), "--once", "--wait", "--now", "2026-12-02T04:02:30Z")
    assert edited.returncode == 3, edited.stderr  # drifted past min_spearman
    [rerun] = _outcomes(edited.stdout)
    assert rerun["action"] == "submitted" and rerun["status"] == "SUCCEEDED"
    assert rerun["model_revision"] != ran["model_revision"] and rerun["fingerprint"] != ran["fingerprint"]
    alert = f"neuron-atlas DRIFT run={rerun['submission_id']} previous={ran['submission_id']} family=nightly"
    assert alert in edited.stderr

    shown = subprocess.run([str(BIN / "neuron-atlas"), "drift", "--atlas", str(atlas), "--format", "json"],
                           capture_output=True, text=True, env=ray_cluster.env, timeout=300)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert sorted(r["concept"] for r in rows) == ["music", "weather"]
    for row in rows:
        assert row["run_id"] == rerun["submission_id"] and row["previous_run_id"] == ran["submission_id"]
        assert row["k"] == 20 and row["kept"] + row["left"] == 20 and 0 <= row["churn"] <= 1
        assert row["spearman"] < 0.9999 and row["drifted"] and len(json.loads(row["movers_json"])) == 10
    diff = subprocess.run([str(BIN / "neuron-atlas"), "diff", "--atlas", str(atlas), "--concept", "music",
                           "--run-b", rerun["submission_id"], "--k", "20"],
                          capture_output=True, text=True, env=ray_cluster.env, timeout=300)
    assert diff.returncode == 0, diff.stderr
    music = next(r for r in rows if r["concept"] == "music")
    assert f"top-20: {music['kept']} kept, {music['entered']} entered, {music['left']} left" in diff.stderr
    assert f"drift of run {rerun['submission_id']} from {ran['submission_id']}" in diff.stderr
