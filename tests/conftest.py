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
def _one_thread():
    """One intra-op thread in the test process, as every actor has (cpus_per_actor: 1) and as the first
    in-process ShardScorer sets it anyway (the suite's thread count no longer depends on test order).
    The 2 cores are shared with Ray's processes, the CLI subprocesses and whatever else runs on the
    machine: a second thread mostly waits at each op's barrier for a core (measured under load: the
    tiny models' naive NEAT 2-3x, SmolLM2's engines 2x slower with 2 threads than with 1)."""
    torch.set_num_threads(1)


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
