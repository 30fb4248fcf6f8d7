"""Model resolution: aliases, local directories, cached hub ids; content revisions; no network."""
from __future__ import annotations

import os
import shutil

import pytest

from attribution.errors import ModelError
from attribution.models import load_model, model_slug, resolve_model_source, weights_revision


def test_alias_resolves_to_cached_safetensors_with_a_content_revision():
    source = resolve_model_source("smollm2-135m")
    assert source.name == "smollm2-135m" and source.revision.startswith("sha256:")
    assert any(name.endswith(".safetensors") for name in os.listdir(source.path))
    model = load_model(source, device="cpu")
    assert (model.n_layers, model.d_mlp, model.d_model) == (30, 1536, 576)


def test_revision_changes_with_the_weights_and_only_then(tmp_path, tiny_sources):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sources["llama"].path, copy)
    assert weights_revision(copy) == tiny_sources["llama"].revision  # same bytes, same revision
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_revision(copy) != tiny_sources["llama"].revision


def test_hub_id_in_the_local_cache_resolves_offline_with_its_commit(tmp_path, tiny_sources, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--Tiny-Llama"
    shutil.copytree(tiny_sources["llama"].path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    source = resolve_model_source("tiny-org/Tiny-Llama")
    assert source.name == "tiny-org--tiny-llama" and source.revision == f"hub:{commit}"
    with pytest.raises(ModelError, match="not a hub id in the local Hugging Face cache.*never downloads"):
        resolve_model_source("tiny-org/not-cached")


def test_model_names_become_atlas_slugs():
    assert model_slug("HuggingFaceTB/SmolLM2-135M") == "huggingfacetb--smollm2-135m"
    assert model_slug("My Model (v2)") == "my-model-v2"
