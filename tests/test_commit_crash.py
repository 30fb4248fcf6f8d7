"""A driver killed (SIGKILL) between the `neurons` commit and the `runs` commit: the rerun of the same
run id adds the missing runs row, with the first attempt's metadata, and scores nothing again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import yaml

from storage.commit import run_committed, run_recorded
from storage.read import list_runs, open_neurons, top_neurons

ROOT = Path(__file__).resolve().parent.parent
UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


def _kill_session(session: int) -> None:
    """Stop what the killed driver left behind (its local Ray's processes), by pid: only its session."""
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == session:
                proc.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


def _run(config: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", "from jobs.cli import entry; entry()", "run", str(config)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        _kill_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_driver_killed_between_the_two_commits_is_repaired_by_the_rerun(tmp_path, tiny_sources):
    atlas = tmp_path / "atlas"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "model": tiny_sources["gpt2"].path, "concepts": str(UNSEEN), "layers": [1], "atlas": str(atlas),
        "ablation": "zero", "shard_neurons": 64, "batch_rows": 32, "run_id": "crash",
        "cluster": {"actors": 1, "cpus_per_actor": 1},
        "reference_contrast": False}))  # tested in test_specificity.py; here it would only add time
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of the driver's own
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")

    killed = _run(config, {**env, "NEURON_ATLAS_CRASH_AT": "between-commits"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert run_committed(str(atlas), "crash") and not run_recorded(str(atlas), "crash")
    assert list_runs(str(atlas)).num_rows == 0  # the run is lost to `runs` until repaired
    version = open_neurons(str(atlas)).version()

    rerun = _run(config, env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "added the row" in rerun.stderr and "shards" not in rerun.stderr.split("added the row")[0].lower()
    runs = list_runs(str(atlas)).to_pylist()
    assert [r["run_id"] for r in runs] == ["crash"] and runs[0]["neurons_version"] == version
    metadata = json.loads(runs[0]["metadata_json"])
    assert metadata["run_id"] == "crash" and "repaired" not in metadata  # the first attempt's metadata
    assert open_neurons(str(atlas)).version() == version  # no second neurons commit
    assert top_neurons(str(atlas), concept=runs[0]["concepts"][0], top=3).column("run_id").to_pylist() == ["crash"] * 3
    assert not (atlas / "_staging" / "crash").exists()
