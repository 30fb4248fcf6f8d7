"""A built wheel, installed into a fresh venv, runs a one-layer job from a directory outside the
repository: the built-in concepts, mean ablation's reference text and derived targets come from the
package data (importlib.resources), not from a checkout.

The venv has no system site-packages and only the wheel's code; its third-party dependencies (torch,
ray, deltalake, ...) come from this environment's site-packages through a .pth path entry (nothing
is downloaded here). A path entry runs no .pth file of that directory, so this environment's editable
install of the project is not visible in the venv: the test checks where the project is imported from.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "attribution", "cluster", "configs", "jobs", "storage"]


def _build_wheel(tmp: Path) -> Path:
    source = tmp / "src"  # a copy: building in the checkout would leave build/ and egg-info behind
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp / "dist"), str(source)], check=True)
    return next((tmp / "dist").glob("neuron_atlas-*.whl"))


def _venv_with(wheel: Path, tmp: Path) -> Path:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_runs_a_one_layer_job_outside_the_repository(tmp_path, tiny_sources):
    venv = _venv_with(_build_wheel(tmp_path), tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=480)

    where = run(str(venv / "bin" / "python"), "-c", "import configs, jobs, storage; print(jobs.__file__); "
                "print(configs.reference_text())")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert line.startswith(str(venv)), where.stdout  # the wheel's copy, not the checkout
    listed = run(str(venv / "bin" / "neuron-atlas"), "list", "concepts")
    assert listed.returncode == 0 and "royalty" in listed.stdout, listed.stderr

    concepts = work / "concepts.yaml"  # no targets: each actor derives them (logit lens vs the neutral text)
    concepts.write_text(yaml.safe_dump({"concepts": [{"name": "weather", "examples": [
        "The rain fell all night and the wind howled.", "A cold storm brought snow to the valley.",
        "The sun came out after the thunder passed."]}]}))
    config = work / "job.yaml"
    config.write_text(yaml.safe_dump({
        "model": tiny_sources["gpt2"].path, "concepts": "concepts.yaml", "layers": [1], "atlas": "atlas",
        "ablation": "mean", "shard_neurons": 128, "batch_rows": 64, "run_id": "wheel",
        "cluster": {"actors": 1, "cpus_per_actor": 1}}))
    dry = run(str(venv / "bin" / "neuron-atlas"), "run", str(config), "--concepts", "builtin", "--dry-run")
    assert dry.returncode == 0 and "royalty" in dry.stdout + dry.stderr, dry.stderr[-2000:]
    job = run(str(venv / "bin" / "neuron-atlas"), "run", str(config))
    assert job.returncode == 0, job.stderr[-3000:]
    query = run(str(venv / "bin" / "neuron-atlas"), "query", "--atlas", "atlas", "--concept", "weather",
                "--top", "3", "--format", "json")
    assert query.returncode == 0, query.stderr
    rows = yaml.safe_load(query.stdout)
    assert [r["ablation"] for r in rows] == ["mean"] * 3 and {r["layer"] for r in rows} == {1}
    assert (work / "atlas" / "neurons").is_dir()
