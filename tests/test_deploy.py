"""The recipes in deploy/: every manifest parses, carries the fields its kind needs, and its command is
one the CLI accepts: parsed by `neuron-atlas`'s own argument parser, and run with --dry-run against
the recipe's job config (with a tiny model and a local atlas swapped in)."""
from __future__ import annotations

import configparser
import io
import json
import shlex
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from cluster.config import load_job_config
from cluster.cron import parse_cron
from jobs.cli import build_parser, main

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MOUNTS = {"/config": DEPLOY, "/etc/neuron-atlas": DEPLOY}  # where the recipes mount deploy/'s files


def _local(path: str) -> Path:
    for mount, folder in MOUNTS.items():
        if path.startswith(mount + "/"):
            return folder / path[len(mount) + 1:]
    raise AssertionError(f"{path} is not under a mount of deploy/'s files")


def _commands() -> dict[str, list[str]]:
    """Recipe -> the neuron-atlas command line it runs (argv, program first)."""
    out = {}
    rayjob = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    out["rayjob.yaml"] = shlex.split(rayjob["spec"]["entrypoint"])
    cron = yaml.safe_load((DEPLOY / "raycronjob.yaml").read_text())
    out["raycronjob.yaml"] = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
    job = yaml.safe_load((DEPLOY / "cronjob.yaml").read_text())
    out["cronjob.yaml"] = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((DEPLOY / "neuron-atlas-schedule.service").read_text())
    out["neuron-atlas-schedule.service"] = shlex.split(unit["Service"]["ExecStart"])
    line = next(l for l in (DEPLOY / "crontab").read_text().splitlines() if l and l[0].isdigit())
    fields = line.split(None, 5)
    parse_cron(" ".join(fields[:5]))  # a valid cron expression
    command = fields[5].split(";")[-1].split(">>")[0]
    out["crontab"] = shlex.split(command)
    return out


def test_manifests_parse_and_carry_what_their_kind_needs():
    rayjob = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert any(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for w in workers)
    cron = yaml.safe_load((DEPLOY / "raycronjob.yaml").read_text())
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    parse_cron(cron["spec"]["schedule"])
    template = cron["spec"]["jobTemplate"]
    # the same cluster spec as the RayJob; only the entrypoint differs (a tick that waits for its run)
    assert template["rayClusterSpec"] == spec["rayClusterSpec"] and template["shutdownAfterJobFinishes"] is True
    assert "RayCronJob" in (DEPLOY / "raycronjob.yaml").read_text() and "1.6" in (DEPLOY / "raycronjob.yaml").read_text()
    job = yaml.safe_load((DEPLOY / "cronjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "CronJob")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    parse_cron(job["spec"]["schedule"])
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read_string((DEPLOY / "neuron-atlas-schedule.timer").read_text())
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Persistent"] == "true"
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "FROM ${RAY_IMAGE}" in docker and "ARG RAY_IMAGE=rayproject/ray:" in docker
    assert "pip wheel" in docker and "neuron_atlas-*.whl" in docker
    for image in [spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"],
                  job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]]:
        assert image.startswith("registry.example.com/neuron-atlas:")
    config = load_job_config(DEPLOY / "nightly.yaml")  # the recipes' job config is a valid config
    assert config.schedule is not None and config.schedule.drift.max_churn == 0.3


@pytest.mark.parametrize("recipe", ["rayjob.yaml", "raycronjob.yaml", "cronjob.yaml",
                                    "neuron-atlas-schedule.service", "crontab"])
def test_recipe_commands_are_accepted_by_the_cli(recipe, tiny_sources, tmp_path):
    argv = _commands()[recipe]
    assert Path(argv[0]).name == "neuron-atlas", argv
    args = build_parser().parse_args(argv[1:])  # argparse exits 2 on anything it does not accept
    configs = [args.config] if args.command == "run" else args.configs
    # The recipe's job config, with the model and atlas swapped for a tiny model and a local atlas.
    data = yaml.safe_load(_local(configs[0]).read_text())
    data.update(model=tiny_sources["llama"].path, atlas=str(tmp_path / "atlas"), layers=[0], dtype="float32",
                concepts=str(_local(configs[0]).parent / data["concepts"]))
    data["cluster"] = {"actors": 1}
    data["schedule"]["model"] = str(Path(tiny_sources["llama"].path).parent / "tiny-l*")  # a glob: its newest
    local = tmp_path / "nightly.yaml"
    local.write_text(yaml.safe_dump(data))
    swapped = [str(local) if a == configs[0] else a for a in argv[1:]]
    if args.command == "schedule":
        swapped = [a for a in swapped if a != "--wait"]  # --dry-run submits nothing, so waits for nothing
    out = io.StringIO()
    with redirect_stdout(out):
        status = main(swapped + ["--dry-run"])
    assert status == 0, out.getvalue()
    if args.command == "schedule":
        [due] = [json.loads(line) for line in out.getvalue().splitlines()]
        assert due["action"] == "submit" and due["model"] == "tiny-llama"
        assert due["scheduled_for"].endswith(("T01:00:00Z", "T00:00:00Z"))  # 02:00 Paris
    else:
        assert "run id" in out.getvalue() and "tiny-llama" in out.getvalue()
