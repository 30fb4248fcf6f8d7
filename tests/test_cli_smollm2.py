"""The installed command on the packaged SmolLM2, as a user runs it: a real run through local Ray,
exact against an independent naive NEAT on a sample, queried back; Ctrl-C commits nothing."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import naive_neat
from attribution.concepts import load_concept_file
from attribution.models import resolve_model_source
from storage.commit import committed_runs

REPO = Path(__file__).resolve().parent.parent
UNSEEN = REPO / "tests" / "data" / "unseen_concepts.yaml"
CLI = [sys.executable, "-m", "jobs.cli"]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def demo_without_contrast(tmp_path: Path, **changes) -> Path:
    """configs/demo.yaml as it is (but for `changes`), without the reference contrast (tested in
    test_specificity.py; here it would add its 35 concepts' preparation to every run)."""
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data.update(concepts=str(REPO / "configs" / data["concepts"]), reference_contrast=False, **changes)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_smollm2_run_query_and_exactness_through_the_cli(tmp_path):
    atlas = tmp_path / "atlas"
    proc = cli("run", str(demo_without_contrast(tmp_path)), "--concepts", str(UNSEEN), "--layers", "0,29", "--atlas", str(atlas),
               "--run-id", "e2e", "--method", "neat")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows"] == 2 * 2 * 1536 and summary["version"] == 1
    assert "shards]" in proc.stderr and "committed run e2e" in proc.stderr

    proc = cli("query", "--atlas", str(atlas), "--concept", "weather", "--top", "3000", "--format", "json",
               "--rank-by", "score")  # raw NEAT scores (the default is the concept-specific ranking)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["rank"] for r in rows] == list(range(1, 3001)) and {r["layer"] for r in rows} == {0, 29}

    model, tokenizer = naive_neat.load(resolve_model_source("smollm2-135m").path)
    concept = next(c for c in load_concept_file(UNSEEN) if c.name == "weather")
    by_key = {(r["layer"], r["neuron"]): r for r in rows}
    top = rows[:6]  # the strongest neurons, plus a few fixed ones
    for layer, neurons in ((0, sorted({r["neuron"] for r in top if r["layer"] == 0} | {0, 700})),
                           (29, sorted({r["neuron"] for r in top if r["layer"] == 29} | {5, 1535}))):
        expected = naive_neat.effects(model, tokenizer, concept.examples, concept.targets, layer, neurons)
        for neuron, effect in zip(neurons, expected):
            got = by_key[(layer, neuron)]["effect"]
            assert abs(got - effect) <= 1e-5 + 1e-4 * abs(effect), (layer, neuron, got, effect)


@pytest.mark.slow
def test_ctrl_c_stops_the_run_without_a_commit_and_exits_130(tmp_path):
    atlas = tmp_path / "atlas"
    # Every layer (minutes of scoring: the run is far from done at its first shard) of the 2 unseen concepts
    # in 64-neuron shards: the actors prepare 2 concepts instead of the demo's 6 and score 64 neurons instead
    # of ~500 before the first shard's progress line (~17 s less in all).
    config = demo_without_contrast(tmp_path, shard_neurons=64)
    proc = subprocess.Popen([*CLI, "run", str(config), "--concepts", str(UNSEEN), "--atlas", str(atlas), "--run-id",
                             "stopped", "--method", "neat"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        seen = ""
        while time.monotonic() < deadline:  # wait until the actors are scoring
            line = proc.stderr.readline()
            seen += line
            if "shards]" in line or not line:
                break
        assert "shards]" in seen, seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "not committed" in err and "--run-id stopped" in err
    assert committed_runs(str(atlas)) == set()
