"""Hostile and careless input files fail fast, in one line, without secrets: alias bombs, binary files,
trailing newlines in names, corrupt weights, read-only or file atlases, planted credentials."""
from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from attribution.concepts import load_concept_file
from attribution.errors import ConceptError, ModelError
from attribution.weight_files import check_weight_files
from cluster.config import ConfigError, load_job_config
from jobs.cli import main
from storage.errors import AtlasError
from storage.preflight import check_atlas_writable

REPO = Path(__file__).resolve().parent.parent
BUILTIN = REPO / "configs" / "concepts" / "builtin.yaml"
BAD_CONCEPTS = REPO / "tests" / "data" / "bad_concepts"

def _bomb_config(tmp_path: Path, key: str) -> Path:
    """A config whose `key` holds a list of nine levels of nine-fold aliases (387 million leaves)."""
    chain = "\n".join(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]" for i in range(9))
    path = tmp_path / f"bomb-{key}.yaml"
    path.write_text(f"model: smollm2-135m\nconcepts: {BUILTIN}\natlas: atlas\n{key}:\n{chain}\n")
    return path


@pytest.mark.parametrize("key", ["layers", "methods"])
def test_alias_bomb_in_a_config_fails_at_once(tmp_path, capsys, key):
    path = _bomb_config(tmp_path, key)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_job_config(path)
    seconds, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 5 * 2**20, (seconds, peak)
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and len(err) < 500


def test_alias_bomb_in_a_concept_name_fails_at_once(tmp_path, capsys):
    chain = "\n".join(f"x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]"
                      for i in range(9))
    path = tmp_path / "concepts.yaml"
    path.write_text(f"{chain}\nconcepts:\n  - name: *l8\n    examples: [a b c]\n")
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ConceptError, match="aliases"):
        load_concept_file(path)
    seconds, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 5 * 2**20, (seconds, peak)


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
    (b"concepts: [" * 10000, "nested deeper than"),
    (b"x: " + b"y" * (5 * 2**20), "larger than"),
])
def test_binary_deep_and_huge_files_fail_in_one_line(tmp_path, capsys, content, message):
    concepts = tmp_path / "concepts.yaml"
    concepts.write_bytes(content)
    with pytest.raises(ConceptError, match=message):
        load_concept_file(concepts)
    config = tmp_path / "job.yaml"
    config.write_bytes(content)
    assert main(["run", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and len(err) < 2100


def test_a_trailing_newline_is_not_part_of_a_name(tmp_path):
    path = tmp_path / "concepts.yaml"
    path.write_text('concepts:\n  - name: "royalty\\n"\n    examples: ["The king wore a crown."]\n')
    with pytest.raises(ConceptError, match="is not a slug"):
        load_concept_file(path)
    config = tmp_path / "job.yaml"
    config.write_text(f'model: smollm2-135m\nconcepts: {BUILTIN}\natlas: atlas\nrun_id: "nightly\\n"\n')
    with pytest.raises(ConfigError, match="run_id"):
        load_job_config(config)


def _tiny_weights(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    directory = tmp_path / "model"
    directory.mkdir()
    save_file({"w": torch.zeros(64, 64), "b": torch.ones(64)}, str(directory / "model.safetensors"))
    return directory


def test_truncated_corrupt_or_misnamed_weights_fail_at_resolve_time(tmp_path):
    directory = _tiny_weights(tmp_path)
    check_weight_files(directory)  # whole
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(ModelError, match="truncated"):
        check_weight_files(directory)
    weights.write_bytes(b"\x00" * 8 + b"garbage")
    with pytest.raises(ModelError, match="corrupt header|not a safetensors"):
        check_weight_files(directory)
    weights.write_bytes(data)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-0001.safetensors"}}))
    with pytest.raises(ModelError, match="missing: model-0001.safetensors"):
        check_weight_files(directory)


def test_an_atlas_that_cannot_be_written_fails_before_anything_runs(tmp_path):
    file = tmp_path / "atlas-file"
    file.write_text("not a directory")
    with pytest.raises(AtlasError, match="is a file"):
        check_atlas_writable(str(file))
    with pytest.raises(AtlasError, match="is a file"):
        check_atlas_writable(str(file / "atlas"))
    check_atlas_writable(str(tmp_path / "new" / "atlas"))  # created later by the run: fine
    assert not (tmp_path / "new").exists()  # the check writes nothing that stays
    if os.geteuid() != 0:  # root writes into read-only directories; a read-only mount stops it (not here)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(AtlasError, match="not writable"):
            check_atlas_writable(str(locked / "atlas"))


# ---- no secrets in any error ------------------------------------------------------------------------

SECRET = "s3cr3t-Pl4nted-0xDEADBEEF"
PASSWORD = "hunter2-Pl4nted-pw"


def _secret_config(tmp_path: Path, **overrides) -> Path:
    data = {"model": "smollm2-135m", "concepts": str(BUILTIN), "layers": [0], "cluster": {"actors": 1},
            "atlas": f"s3://bucket/atlas",
            "storage_options": {"AWS_ENDPOINT_URL": f"http://admin:{PASSWORD}@127.0.0.1:9", "AWS_REGION": "us-east-1",
                                "AWS_ACCESS_KEY_ID": "AKIAPLANTED", "AWS_SECRET_ACCESS_KEY": SECRET,
                                "max_retries": "0"}}
    data.update(overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def _failing_commands(tmp_path: Path) -> list[list[str]]:
    """The bad-input cases of the suite (bad configs, bad concept files) with credentials planted."""
    commands = []
    for overrides in ({"modle": "x"}, {"layers": "first"}, {"cluster": {"actors": "two"}}, {"dtype": "float16"},
                      {"run_id": f"../{SECRET}"}, {"model": f"http://u:{PASSWORD}@host/model"},
                      {"layers": [0, 99]}, {}):
        sub = tmp_path / f"case{len(commands)}"
        sub.mkdir()
        # A valid config (no overrides) fails only at its unreachable atlas, which --dry-run does not probe.
        commands.append(["run", str(_secret_config(sub, **overrides))] + (["--dry-run"] if overrides else []))
    for bad in ("bad_slug.yaml", "unknown_key.yaml", "untokenizable_target.yaml"):  # local atlas: reach the concepts
        sub = tmp_path / f"case{len(commands)}"
        sub.mkdir()
        commands.append(["run", str(_secret_config(sub, atlas="atlas")), "--concepts", str(BAD_CONCEPTS / bad),
                         "--dry-run"])
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"model: smollm2-135m\nstorage_options:\n  AWS_SECRET_ACCESS_KEY: {SECRET}: [\n")
    commands.append(["run", str(broken)])
    broken_url = tmp_path / "broken-url.yaml"
    broken_url.write_text(f"atlas: s3://b/a\n  endpoint: http://admin:{PASSWORD}@h:9 ]\n")
    commands.append(["run", str(broken_url)])
    commands.append(["sql", "--atlas", f"s3://admin:{PASSWORD}@bucket/atlas", "SELECT 1"])
    return commands


def test_no_error_contains_a_planted_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://admin:{PASSWORD}@127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for command in _failing_commands(tmp_path):
        code = main(command)
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert code != 0, command
        assert SECRET not in text and PASSWORD not in text, (command, text)
        assert "Traceback" not in text and len(captured.err.strip().splitlines()) <= 2, (command, captured.err)


def test_a_short_common_word_in_a_credential_variable_does_not_garble_errors(monkeypatch):
    """CI runners set variables such as GH_TOKEN=token: only credential-like values (8+ characters,
    whole words) are redacted, so 'tokenizer' and 'unknown token' stay readable."""
    from storage.redaction import REDACTED, redact
    monkeypatch.setenv("GH_TOKEN", "token")
    monkeypatch.setenv("CI_JOB_SECRET", "s3cr3t-Pl4nted")
    message = "the model's tokenizer: it encodes to an unknown token; key s3cr3t-Pl4nted; s3cr3t-Pl4ntedX"
    assert redact(message) == (f"the model's tokenizer: it encodes to an unknown token; key {REDACTED}; "
                               "s3cr3t-Pl4ntedX")
