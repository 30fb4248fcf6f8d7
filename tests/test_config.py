"""Bad configs are rejected before anything runs: exit 2, one message naming file/key/value, atlas untouched."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, apply_overrides, load_job_config
from jobs.cli import main

REPO = Path(__file__).resolve().parent.parent
BUILTIN = REPO / "configs" / "concepts" / "builtin.yaml"
BAD_CONCEPTS = REPO / "tests" / "data" / "bad_concepts"


def write_config(tmp_path: Path, **overrides) -> Path:
    data = {"model": "smollm2-135m", "concepts": str(BUILTIN), "layers": [0, 29], "atlas": "atlas",
            "cluster": {"actors": 1}}
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_config_is_valid():
    config = load_job_config(REPO / "configs" / "demo.yaml")
    assert config.model == "smollm2-135m" and config.layers is None and config.cluster.actors == 2
    assert config.atlas == str(REPO / "atlas") and config.concepts == str(BUILTIN)


def test_flags_override_the_config(tmp_path):
    config = apply_overrides(load_job_config(write_config(tmp_path)), layers="3,1", actors=3, atlas=str(tmp_path / "x"))
    assert config.layers == (1, 3) and config.cluster.actors == 3 and config.atlas == str(tmp_path / "x")


@pytest.mark.parametrize("overrides, message", [
    ({"modle": "x"}, "unknown key 'modle'"),
    ({"layers": "first"}, "key 'layers' has value 'first'"),
    ({"cluster": {"actors": "two"}}, "key 'cluster.actors' has value 'two': expected an integer >= 1"),
    ({"cluster": {"actorz": 2}}, "unknown key 'cluster.actorz'"),
    ({"ablation": "half"}, "key 'ablation' has value 'half'"),
    ({"dtype": "float16"}, "key 'dtype' has value 'float16'"),
    ({"model": None}, "missing required key 'model'"),
    ({"batch_rows": 1}, "key 'batch_rows' has value 1"),
    ({"run_id": "../escape"}, "key 'run_id' has value '../escape'"),
])
def test_bad_config_values_name_the_file_key_and_value(tmp_path, overrides, message):
    path = write_config(tmp_path, **overrides)
    with pytest.raises(ConfigError) as err:
        load_job_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.fixture(scope="module")
def smollm2_prepared():
    """The one-time GGUF conversion prints its own note; these tests are about the error line after it."""
    from attribution.models import resolve_model_source
    resolve_model_source("smollm2-135m")


@pytest.mark.usefixtures("smollm2_prepared")
@pytest.mark.parametrize("overrides, args, message", [
    ({"layers": [0, 30]}, [], "key 'layers' has value 30: layer not in 0..29 for model smollm2-135m"),
    ({"model": "no-such-model"}, [], "key 'model' has value 'no-such-model': model 'no-such-model' is not a built-in alias"),
    ({"concepts": "missing.yaml"}, [], "key 'concepts' has value '"),
    ({"concepts": "missing.yaml"}, [], "missing.yaml' does not exist"),
    ({}, ["--concepts", str(BAD_CONCEPTS / "duplicate_name.yaml")], "duplicate concept name"),
    ({}, ["--concepts", str(BAD_CONCEPTS / "untokenizable_target.yaml")],
     f"key 'concepts' has value '{BAD_CONCEPTS / 'untokenizable_target.yaml'}': concept 'royalty': target word "
     "'<|endoftext|>' cannot be encoded by the model's tokenizer: it encodes to a special or unknown token"),
    ({}, ["--layers", "-1"], "key 'layers' has value -1"),
    ({}, ["--dtype", "float16"], "key 'dtype' has value 'float16'"),
])
def test_cli_rejects_bad_input_with_status_2_and_writes_nothing(tmp_path, capsys, overrides, args, message):
    path = write_config(tmp_path, **overrides)
    assert main(["run", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "atlas").exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, capsys):
    from transformers import T5Config

    model_dir = tmp_path / "t5"
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=37).save_pretrained(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"")
    assert main(["run", str(write_config(tmp_path, model=str(model_dir)))]) == 2
    err = capsys.readouterr().err
    assert "architecture 't5'" in err and "llama, mistral, qwen2, gpt2, bert" in err


def test_model_directory_without_safetensors_is_refused(tmp_path, capsys):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "pytorch_model.bin").write_bytes(b"")
    assert main(["run", str(write_config(tmp_path, model=str(model_dir)))]) == 2
    assert "loads safetensors only" in capsys.readouterr().err


def _llama_directory(tmp_path: Path, **config_changes) -> Path:
    """A model directory with a tiny Llama config.json and a weights file, but no tokenizer."""
    from transformers import LlamaConfig

    model_dir = tmp_path / "no-tokenizer"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=64).save_pretrained(model_dir)
    if config_changes:
        data = json.loads((model_dir / "config.json").read_text())
        data.update(config_changes)
        data = {k: v for k, v in data.items() if v is not None}
        (model_dir / "config.json").write_text(json.dumps(data))
    (model_dir / "model.safetensors").write_bytes(b"")
    return model_dir


@pytest.mark.parametrize("config_changes, message", [
    ({}, "transformers cannot load its tokenizer"),
    ({"model_type": None}, "transformers cannot read its config.json"),
    ({"model_type": "no-such-architecture"}, "transformers cannot read its config.json"),
])
def test_a_model_directory_transformers_cannot_read_exits_2_in_one_line(tmp_path, capsys, config_changes, message):
    model_dir = _llama_directory(tmp_path, **config_changes)
    assert main(["run", str(write_config(tmp_path, model=str(model_dir)))]) == 2
    err = capsys.readouterr().err
    assert f"key 'model' has value '{model_dir}'" in err and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "atlas").exists()


def test_installed_command_exits_2_without_traceback(tmp_path):
    path = write_config(tmp_path, layers=[99])
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "layer not in 0..29" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "atlas").exists()
