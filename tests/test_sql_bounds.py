"""`sql` is bounded: a runaway query stops at --timeout (exit 124), Ctrl-C stops it (exit 130), a huge
csv result streams in constant memory, the table format is capped with a note, PIVOT is allowed.
Subprocesses: the properties are about the real command (its signals, exit status and memory)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "storage"))
from atlas_rows import build_rows  # noqa: E402

from jobs.cli import main  # noqa: E402
from storage.commit import commit_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RUNAWAY = "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t"


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sqlbounds") / "atlas")
    commit_run(path, build_rows("r1", seed=1), run_id="r1",
               metadata={"model": {"name": "tiny-gpt2", "n_layers": 3, "d_mlp": 8}})
    return path


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=kwargs.pop("stdout", subprocess.PIPE), stderr=subprocess.PIPE, **kwargs)


def test_runaway_query_stops_at_its_timeout(atlas):
    started = time.monotonic()
    proc = _cli("sql", "--atlas", atlas, "--timeout", "2", RUNAWAY)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 124, err
    assert "timeout of 2 s" in err and len(err.strip().splitlines()) == 1 and out == ""
    assert time.monotonic() - started < 120  # start-up on a loaded machine + 2 s, never "forever"


@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_stops_a_running_query(atlas, tmp_path, signum, status, said):
    # The query's private spill directory appears in TMPDIR once the query is open: then send SIGINT.
    proc = _cli("sql", "--atlas", atlas, "--timeout", "0", RUNAWAY, env={"TMPDIR": str(tmp_path)})
    deadline = time.monotonic() + 240
    while not any(p.name.startswith("neuron-atlas-sql-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert said in err and "Traceback" not in err
    assert not any(p.name.startswith("neuron-atlas-sql-") for p in tmp_path.iterdir())  # spill dir removed


def _peak_rss_mb(query: str, atlas: str) -> tuple[float, int]:
    """Peak RSS (MB) of `sql --format csv` and the number of lines it printed, read as they stream."""
    measure = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")
    proc = subprocess.Popen([sys.executable, "-c", measure, sys.executable, "-m", "jobs.cli", "sql", "--atlas",
                             atlas, "--format", "csv", query], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = 0
    for chunk in iter(lambda: proc.stdout.read(1 << 20), b""):
        lines += chunk.count(b"\n")
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    return int(err.strip().splitlines()[-1]) / 1024, lines


def test_a_ten_million_row_result_streams_in_constant_memory(atlas):
    small, small_lines = _peak_rss_mb("SELECT range AS i, range * 2 AS j FROM range(100000)", atlas)
    big, big_lines = _peak_rss_mb("SELECT range AS i, range * 2 AS j FROM range(10000000)", atlas)
    assert (small_lines, big_lines) == (100_001, 10_000_001)
    # 10M rows of two BIGINTs are ~160 MB in Arrow and ~150 MB as CSV; streamed, the peak stays put.
    assert big < small + 100, (small, big)


def test_table_format_is_capped_with_a_note(atlas, capsys):
    assert main(["sql", "--atlas", atlas, "SELECT range FROM range(5000)"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 + 1000
    assert "first 1,000 rows" in captured.err and "--no-limit" in captured.err
    assert main(["sql", "--atlas", atlas, "--limit", "3", "SELECT range FROM range(5000)"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert main(["sql", "--atlas", atlas, "--no-limit", "SELECT range FROM range(1500)"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1501 and "note" not in captured.err


def test_query_from_a_file_and_stdin_and_pivot(atlas, tmp_path, capsys, monkeypatch):
    query = tmp_path / "q.sql"
    query.write_text("PIVOT (SELECT concept, layer FROM neurons) ON concept USING count(*) ORDER BY layer")
    assert main(["sql", "--atlas", atlas, "-f", str(query), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["layer,music,royalty", "0,8,8", "1,8,8", "2,8,8"]
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"SELECT 41 + 1 AS n")))
    assert main(["sql", "--atlas", atlas, "-", "--format", "json"]) == 0
    assert capsys.readouterr().out.strip() == '[{"n": 42}]'


@pytest.mark.parametrize("query", [
    "PIVOT (SELECT 1 AS a, 'x' AS b) ON b USING sum(a); COPY (SELECT 1) TO '{out}'",
    "COPY (PIVOT (SELECT 1 AS a, 'x' AS b) ON b USING sum(a)) TO '{out}'",
    "SELECT * FROM read_text(current_setting('temp_directory') || '/../../etc/passwd')",
    "SELECT * FROM read_text('.tmp/*')",
])
def test_pivot_and_spill_directory_open_no_way_out(atlas, tmp_path, capsys, query):
    out = tmp_path / "out.csv"
    assert main(["sql", "--atlas", atlas, query.format(out=out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_list_columns_are_json_in_csv(atlas, capsys):
    assert main(["sql", "--atlas", atlas, "--format", "csv", "SELECT [1, 2] AS xs, {'a': 'b'} AS s"]) == 0
    assert capsys.readouterr().out.splitlines() == ["xs,s", '"[1, 2]","{""a"": ""b""}"']


def test_a_path_without_an_atlas_is_an_error_for_every_read_command(tmp_path, capsys):
    empty = str(tmp_path / "nothing-here")
    for args in (["sql", "SELECT 1"], ["runs"], ["query", "--concept", "x"], ["neuron", "--layer", "0", "--neuron", "0"],
                 ["atlas", "history"], ["report", "--concept", "x"], ["validate", "--concept", "x"],
                 ["diff", "--concept", "x", "--run-a", "a", "--run-b", "b"]):
        head = args[:2] if args[0] == "atlas" else args[:1]
        assert main([*head, "--atlas", empty, *args[len(head):]]) == 2, args
        err = capsys.readouterr().err
        assert f"no atlas at {empty}" in err and len(err.strip().splitlines()) == 1
    file = tmp_path / "a-file"
    file.write_text("x")
    assert main(["runs", "--atlas", str(file)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_neuron_the_model_does_not_have_is_an_error(atlas, capsys):
    assert main(["neuron", "--atlas", atlas, "--layer", "2", "--neuron", "7", "--top", "100"]) == 0
    assert main(["neuron", "--atlas", atlas, "--layer", "55", "--neuron", "0"]) == 2
    assert "layers 0..2, neurons 0..7" in capsys.readouterr().err
    assert main(["neuron", "--atlas", atlas, "--layer", "0", "--neuron", "8", "--k", "5"]) == 2
