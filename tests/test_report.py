"""`neuron-atlas report`: one well-formed, self-contained HTML file whose numbers are the atlas's, with
sections present or skipped as the run's data says, hostile text escaped, and bad input refused."""
from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timezone
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from jobs.cli import main
from jobs.report import TOP_K, ReportData, heatmap_svg, layer_bands, render_report, ticks
from storage.commit import commit_run, rank_rows
from storage.contrast import generic_neurons
from storage.read import top_neurons
from storage.schema import shard_table
from storage.validation import VALIDATION_SCHEMA, append_validations

CONCEPTS = ("royalty", "music", "negation")
LAYERS, NEURONS = 4, 256
HOSTILE = "<script>alert('x')</script> & \"quotes\""
GENERIC = (2, 7)  # planted: top-ranked for every concept
VOID = {"meta", "br", "img", "input", "link", "hr", "col", "wbr", "source", "area", "base", "embed", "track"}


def run_rows(run_id: str, *, methods=(("neat", "zero"), ("selectivity", "none")), layers: int = LAYERS,
             neurons: int = NEURONS, concepts=CONCEPTS, seed: int = 0) -> pa.Table:
    """Seeded rows of one run; selectivity rows carry selectivity, consistency and act_mean/std."""
    rng = np.random.default_rng(seed)
    grid = [(c, m, a, layer, n) for c in concepts for m, a in methods for layer in range(layers)
            for n in range(neurons)]
    effect = rng.normal(size=len(grid)).astype(np.float32)
    score = np.abs(effect)
    is_sel = np.array([g[1] == "selectivity" for g in grid])
    planted = np.array([(g[3], g[4]) == GENERIC for g in grid])
    score[planted] = 20.0
    stat = lambda values: pa.array(values.astype(np.float32), mask=~is_sel)  # noqa: E731
    return shard_table({
        "model": ["tiny-gpt2"] * len(grid), "model_revision": ["rev0"] * len(grid),
        "concept": [g[0] for g in grid], "method": [g[1] for g in grid], "ablation": [g[2] for g in grid],
        "run_id": [run_id] * len(grid),
        "layer": pa.array([g[3] for g in grid], pa.int32()), "neuron": pa.array([g[4] for g in grid], pa.int32()),
        "score": pa.array(score, pa.float32()), "effect": pa.array(effect, pa.float32()),
        "activation": pa.array(rng.normal(size=len(grid)).astype(np.float32), pa.float32()),
        "selectivity": stat(effect), "consistency": stat(rng.uniform(size=len(grid))),
        "act_mean": stat(rng.normal(size=len(grid))), "act_std": stat(rng.uniform(0.5, 1.5, size=len(grid))),
    })


METADATA = {"concepts": [{"name": "royalty", "target_words": ["king", HOSTILE], "base_log_p": -17.5}],
            "warnings": [f"target {HOSTILE} splits into several tokens"], "device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("report") / "atlas")
    commit_run(uri, run_rows("r1"), run_id="r1", metadata=METADATA)
    commit_run(uri, run_rows("r2", methods=(("neat", "zero"),), seed=1), run_id="r2", metadata={})
    now = datetime.now(timezone.utc)
    append_validations(uri, pa.Table.from_pylist([
        {"run_id": "r1", "model": "tiny-gpt2", "concept": "royalty", "method": "neat", "ablation": "zero", "k": k,
         "top_change": 3.5 + k, "random_mean": 0.01, "random_std": 0.02, "z_score": 170.0, "p_value": 1 / 21,
         "draws": 20, "other_changes_json": json.dumps({"music": -1.25, "negation": 0.5}),
         "neutral_loss_change": 0.002, "created_at": now} for k in (1, 5)], schema=VALIDATION_SCHEMA))
    return uri


class Page(HTMLParser):
    """Checks nesting (every opened tag closed in order) and collects each section's text, tables,
    tags and SVG <title> tooltips."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.sections: list[dict] = [{"title": "", "text": [], "tables": [], "tags": Counter(), "tips": []}]
        self.in_h2 = self.in_title = False
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags {self.stack}"
        self.by_title = {s["title"]: s for s in self.sections}

    def handle_starttag(self, tag, attrs):
        section = self.sections[-1]
        if tag == "section":
            self.sections.append({"title": "", "text": [], "tables": [], "tags": Counter(), "tips": []})
        section = self.sections[-1]
        section["tags"][tag] += 1
        section["tags"].update(f"{tag}.{value}" for name, value in attrs if name == "class")
        if tag == "table":
            section["tables"].append([])
        elif tag == "tr":
            section["tables"][-1].append([])
        elif tag in ("td", "th"):
            section["tables"][-1][-1].append("")
        elif tag == "title" and "svg" in self.stack:
            section["tips"].append("")
        self.in_h2 = tag == "h2"
        self.in_title = tag == "title" and "svg" in self.stack
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.sections[-1]["tags"][tag] += 1
        self.sections[-1]["tags"].update(f"{tag}.{value}" for name, value in attrs if name == "class")

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        self.stack.pop()
        self.in_h2 = self.in_title = False

    def handle_data(self, data):
        section = self.sections[-1]
        section["text"].append(data)
        if self.in_h2:
            section["title"] += data
        if self.in_title:
            section["tips"][-1] += data
        if self.stack and self.stack[-1] in ("td", "th"):
            section["tables"][-1][-1][-1] += data

    def text(self, title: str) -> str:
        return " ".join(self.by_title[title]["text"])


def report(atlas: str, tmp_path, capsys, *args: str) -> tuple[str, Page]:
    out = tmp_path / "out.html"
    assert main(["report", "--atlas", atlas, "--concept", "royalty", "--out", str(out), *args]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text(encoding="utf-8")
    return text, Page(text)


def test_report_of_a_run_with_selectivity_and_validation(atlas, tmp_path, capsys):
    text, page = report(atlas, tmp_path, capsys, "--run", "r1", "--top", "10")
    assert "<script" not in text and "<link" not in text and "src=" not in text and "url(http" not in text
    header = " ".join(page.sections[0]["text"])
    for shown in ("tiny-gpt2", "rev0", "r1", "neat", "zero", "royalty", "1,024 in 4 layers", "cpu, float32"):
        assert shown in header

    top = top_neurons(atlas, concept="royalty", run_id="r1", top=10).to_pylist()
    sel = top_neurons(atlas, concept="royalty", method="selectivity", run_id="r1", top=LAYERS * NEURONS)
    sel = {(r["layer"], r["neuron"]): r for r in sel.to_pylist()}
    header_row, *rows = page.by_title["Top 10 neurons"]["tables"][0]
    assert header_row == ["rank", "layer", "neuron", "score", "effect", "activation", "selectivity", "consistency",
                          "act_mean", "act_std"]
    assert [r[0] for r in rows] == [str(i) for i in range(1, 11)] and rows[0][1:3] == ["2", "7"]
    for got, want in zip(rows, top):
        s = sel[(want["layer"], want["neuron"])]
        assert got[:6] == [str(want["rank"]), str(want["layer"]), str(want["neuron"]), f"{want['score']:.6g}",
                           f"{want['effect']:.6g}", f"{want['activation']:.6g}"]
        assert got[6:8] == [f"{s['selectivity']:.4g}", f"{s['consistency']:.4g}"]

    heat = page.by_title["Score by layer and neuron"]
    assert len(heat["tips"]) == LAYERS * 128  # 256 neurons in 128 cells of 2
    assert "layer 2, neurons 6-7: max score 20 (neuron 7)" in heat["tips"]

    everyone = top_neurons(atlas, concept="royalty", run_id="r1", top=TOP_K).column("layer").to_pylist()
    bars = page.by_title[f"Top-{TOP_K} neurons per layer"]["tips"]
    assert bars == [f"layer {layer}: {everyone.count(layer)} of the top-{TOP_K}" for layer in range(LAYERS)]

    scatter = page.by_title["Selectivity vs consistency"]
    assert scatter["tags"]["path.dots"] == 1 and scatter["tags"]["circle.mark"] == 10
    assert "Effect vs activation" not in page.by_title

    sankey = page.by_title["Concepts across layers"]["tips"]
    for concept in CONCEPTS:
        layers = top_neurons(atlas, concept=concept, run_id="r1", top=TOP_K).column("layer").to_pylist()
        for layer in range(LAYERS):
            if layers.count(layer):
                assert f"{concept} -> L{layer}: {layers.count(layer)} of its top-{TOP_K}" in sankey

    passports = page.by_title["Neuron passports"]
    assert passports["tags"]["div.card"] == 10
    run = pa.concat_tables([top_neurons(atlas, concept=c, run_id="r1", top=TOP_K) for c in CONCEPTS])
    generic = {(r["layer"], r["neuron"]) for r in generic_neurons(run).to_pylist()}
    assert GENERIC in generic
    assert passports["tags"]["span.badge"] == sum((r["layer"], r["neuron"]) in generic for r in top)
    first_card = passports["tables"][0]
    assert first_card[0] == ["concept", "method", "ablation", "rank", "effect", "activation", "range"]
    assert {(r[0], r[1], r[3]) for r in first_card[1:]} >= {(c, "neat", "1") for c in CONCEPTS}

    validation = page.by_title["Validation"]["tables"][0]
    assert validation[0][:5] == ["method", "ablation", "set to", "k", "top-k change"]
    assert "prompt change" in validation[0] and "shared top-k" in validation[0]
    assert [r[3] for r in validation[1:]] == ["1", "5"]
    assert validation[1][4] == "4.5" and validation[1][11] == "music -1.250"


def test_latest_run_and_default_file_name_skip_what_the_run_lacks(atlas, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--atlas", atlas, "--concept", "royalty"]) == 0
    assert capsys.readouterr().out.strip() == "report-royalty-r2.html"
    page = Page((tmp_path / "report-royalty-r2.html").read_text(encoding="utf-8"))
    assert "r2" in " ".join(page.sections[0]["text"])
    assert page.by_title["Top 20 neurons"]["tables"][0][0] == ["rank", "layer", "neuron", "score", "effect",
                                                                "activation"]
    assert "Selectivity vs consistency" not in page.by_title
    assert page.by_title["Effect vs activation"]["tags"]["circle.mark"] == 20
    assert "no validation of royalty in run r2 yet" in page.text("Validation")
    assert not page.by_title["Validation"]["tables"]
    assert [p.name for p in tmp_path.iterdir()] == ["report-royalty-r2.html"]  # no temporary file left


def test_run_metadata_text_is_escaped(atlas, tmp_path, capsys):
    text, page = report(atlas, tmp_path, capsys, "--run", "r1")
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    header = "".join(page.sections[0]["text"])
    assert f"king, {HOSTILE} (base log p(T) -17.5)" in header
    assert f"warning: target {HOSTILE} splits into several tokens" in header


@pytest.mark.parametrize("args, message", [
    (["--concept", "weather"], "concept 'weather' is not in the atlas"),
    (["--concept", "royalty", "--run", "r9"], "run 'r9' has no rows"),
    (["--concept", "royalty", "--method", "atp"], "method 'atp' has no rows"),
    (["--concept", "royalty", "--ablation", "mean"], "ablation 'mean' has no rows"),
    (["--concept", "royalty", "--top", "0"], "--top 0: expected a positive number"),
    (["--concept", "royalty", "--out", "missing/r.html"], "expected a file path in an existing directory"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(atlas, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in args else ["--out", "r.html"]
    assert main(["report", "--atlas", atlas, *args, *out]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("neuron-atlas report: error: ") and message in captured.err
    assert list(tmp_path.iterdir()) == []


def test_heatmap_buckets_neurons_by_max_score():
    layers = np.repeat(np.array([0, 5], np.int32), 1536)
    neurons = np.tile(np.arange(1536, dtype=np.int32), 2)
    scores = np.zeros(2 * 1536, np.float32)
    scores[1536 + 1000] = 3.0  # layer 5, cell 1000 // 12 = 83
    svg = heatmap_svg(layers, neurons, scores)
    assert svg.count("<title>") == 2 * 128
    assert "layer 5, neurons 996-1007: max score 3 (neuron 1000)" in svg
    assert [len(b) for b in layer_bands(list(range(30)))] == [4] * 7 + [2]
    assert ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0] and ticks(-3.3, 7.1)[0] == -2


def test_a_full_size_run_gives_a_small_report():
    """30 layers x 1536 neurons, 6 concepts, neat and selectivity: every neuron drawn, under 2 MB."""
    concepts = ("royalty", "music", "negation", "male", "female", "past_tense")
    rows = rank_rows(run_rows("big", layers=30, neurons=1536, concepts=concepts))
    rows = rows.append_column("created_at", pa.array([None] * rows.num_rows, pa.timestamp("us", tz="UTC")))
    pick = lambda method: rows.filter(pc.and_(pc.equal(rows["concept"], "royalty"),  # noqa: E731
                                              pc.equal(rows["method"], method)))
    data = ReportData(model="smollm2-135m", revision="rev", run_id="big", concept="royalty", method="neat",
                      ablation="zero", created_at=None, block=pick("neat"),
                      top_rows=rows.filter(pc.less_equal(rows["rank"], TOP_K)), selectivity=pick("selectivity"))
    start = time.perf_counter()
    text = render_report(data)
    seconds = time.perf_counter() - start
    page = Page(text)
    assert len(page.by_title["Score by layer and neuron"]["tips"]) == 30 * 128
    assert len(text.encode()) < 2_000_000 and seconds < 5, (len(text), seconds)
