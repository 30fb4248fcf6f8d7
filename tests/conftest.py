"""Shared fixtures: tiny random-weight models saved as real HF directories, and the packaged SmolLM2."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from attribution.models import load_model, resolve_model_source  # noqa: E402
from ray_local import local_ray_session  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory):
    """family -> ModelSource of a seeded tiny model directory (Llama with GQA, GPT-2)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_model(family, root / f"tiny-{family}") for family in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def tiny_models(tiny_sources):
    return {family: load_model(source, device="cpu") for family, source in tiny_sources.items()}


@pytest.fixture(scope="session")
def smollm2():
    return load_model(resolve_model_source("smollm2-135m"), device="cpu")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for one test module (request it, or `pytestmark = usefixtures("local_ray")`)."""
    import ray

    with local_ray_session():
        yield ray
