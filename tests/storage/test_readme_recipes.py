"""Every Python recipe of the README's "The atlas on object storage" runs as written, against an
atlas of two runs on a real S3 API server (moto on 127.0.0.1)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from s3_server import start_moto
from storage.commit import commit_run

README = Path(__file__).resolve().parents[2] / "README.md"


def recipes() -> list[str]:
    text = README.read_text()
    section = text[text.index("## The atlas on object storage"):text.index("## Benchmarks")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def s3_atlas(tmp_path_factory):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from atlas_rows import build_rows

    server, s3 = start_moto()
    try:
        uri = f"s3://{s3.new_bucket()}/atlas"
        for seed, run in enumerate(("nightly-1", "nightly-2"), start=1):
            commit_run(uri, build_rows(run, seed=seed, neurons=40), run_id=run, metadata={},
                       storage_options=s3.storage_options)
        yield uri, s3.storage_options
    finally:
        server.stop()


def test_the_section_has_the_four_recipes():
    assert len(recipes()) == 4


@pytest.mark.parametrize("index", range(4), ids=["atlas-api", "duckdb", "polars", "pandas"])
def test_recipe_runs(s3_atlas, index):
    uri, options = s3_atlas
    scope = {"atlas_uri": uri, "storage_options": options}
    exec(compile(recipes()[index], f"README recipe {index}", "exec"), scope)
    top = scope.get("top")
    if index == 3:
        df = scope["df"]
        assert len(df) == 2 * 20 and set(df.run_id) == {"nightly-1", "nightly-2"}
        assert set(scope["at_version_1"].run_id) == {"nightly-1"}
        return
    assert top is not None
    rows = top.to_dicts() if hasattr(top, "to_dicts") else top.to_pylist()
    assert len(rows) == (20 if index == 0 else 40)  # DuckDB and Polars: both runs' top 20
    if index == 0:
        assert scope["change"].neurons == 120 and len(scope["passport"]) >= 1
        assert scope["per_layer"].num_rows == 3
