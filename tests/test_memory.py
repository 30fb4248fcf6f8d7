"""The planner counts what an actor allocates (cluster/capacity.py): a fresh process loads a random-weight
Llama from a bf16 checkpoint, prepares a concept and scores two batches of layer 0, and its peak resident
set is below the planner's estimate for a CPU actor, by at most 25% (benchmarks/bench_memory.py measures
the ~1B model the same way)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_memory import SHAPES, measure, save_random_llama  # noqa: E402


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):  # 0.15 B parameters: 0.3 GB as a bf16 checkpoint, 0.6 GB as float32
    return save_random_llama(tmp_path_factory.mktemp("memory") / "llama-test", SHAPES["test"])


def test_an_actors_peak_memory_is_within_the_planners_estimate(small_llama):
    result = measure(small_llama, dtype="float32", batch_rows=64, concepts=1)
    assert 0.75 * result["estimate"] <= result["peak_rss"] <= result["estimate"], result
