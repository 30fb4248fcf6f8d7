"""Fixtures for the atlas tests: small deterministic runs built as SHARD_SCHEMA tables."""
from __future__ import annotations

import pytest

from atlas_rows import build_rows


@pytest.fixture
def make_rows():
    return build_rows


@pytest.fixture
def atlas(tmp_path) -> str:
    return str(tmp_path / "atlas")
