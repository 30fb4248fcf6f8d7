"""Schema constants, name validation and schema checks of the atlas layer."""
import pyarrow as pa
import pytest

from storage.errors import AmbiguousModelError, AtlasError, UnknownConceptError
from storage.schema import ATLAS_SCHEMA, SHARD_SCHEMA, check_schema, validate_name


def test_schema_columns_in_contract_order():
    assert SHARD_SCHEMA.names == [
        "model", "model_revision", "concept", "method", "ablation", "run_id",
        "layer", "neuron", "score", "effect", "activation",
        "act_mean", "act_std", "range_low", "range_high", "selectivity", "consistency",
    ]
    assert ATLAS_SCHEMA.names == SHARD_SCHEMA.names + ["rank", "created_at"]
    assert ATLAS_SCHEMA.field("rank").type == pa.int32()
    assert ATLAS_SCHEMA.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert SHARD_SCHEMA.field("score").type == pa.float32()


@pytest.mark.parametrize("value", ["../x", "a/b", "", "Upper", "has space", ".hidden", "-lead", "a" * 129, "x\n", None])
def test_validate_name_rejects(value):
    with pytest.raises(AtlasError, match=r"model .* is not a valid name: expected"):
        validate_name("model", value)


@pytest.mark.parametrize("value", ["smollm2-135m", "run-2026.01.02_a", "0", "gpt2"])
def test_validate_name_accepts(value):
    assert validate_name("run", value) == value


def test_concept_and_shard_patterns():
    assert validate_name("concept", "past_tense") == "past_tense"
    with pytest.raises(AtlasError, match="concept 'a.b'"):
        validate_name("concept", "a.b")  # concept slugs have no "."
    with pytest.raises(AtlasError):
        validate_name("concept", "c" * 65)
    assert validate_name("shard", "neat-royalty-L003-n000000") == "neat-royalty-L003-n000000"
    with pytest.raises(AtlasError, match="shard '../s'"):
        validate_name("shard", "../s")


def test_check_schema_names_the_problem(make_rows):
    rows = make_rows("r1")
    check_schema(rows, SHARD_SCHEMA, what="ok")
    with pytest.raises(AtlasError, match=r"shard x: schema does not match: missing columns \['effect'\]"):
        check_schema(rows.drop_columns(["effect"]), SHARD_SCHEMA, what="shard x")
    as_double = rows.set_column(8, "score", rows.column("score").cast(pa.float64()))
    with pytest.raises(AtlasError, match=r"wrong types: score is double \(expected float\)"):
        check_schema(as_double, SHARD_SCHEMA, what="shard x")
    with pytest.raises(AtlasError, match="unexpected columns"):
        check_schema(rows.append_column("extra", rows.column("layer")), SHARD_SCHEMA, what="shard x")
    with pytest.raises(AtlasError, match="columns in order"):
        check_schema(rows.select(list(reversed(rows.column_names))), SHARD_SCHEMA, what="shard x")


def test_error_attributes():
    e = UnknownConceptError("no", available=["b", "a"])
    assert isinstance(e, AtlasError) and e.available == ["a", "b"]
    assert AmbiguousModelError("two", models=["y", "x"]).models == ["x", "y"]


def test_storage_imports_neither_torch_nor_ray():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, storage.schema, storage.location, storage.staging, storage.commit, storage.read; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
