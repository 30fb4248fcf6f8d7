"""The report lays out without overlap: rendered in headless Chromium at 1400, 1024 and 768 px, no
passport card's table spills out of its card, no two cards overlap, and the page needs no sideways
scrolling. Boxes come from a script in the page that writes them into the DOM (--dump-dom)."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from jobs.cli import main
from storage.commit import commit_run
from storage.validation import VALIDATION_SCHEMA, append_validations
from test_report import METADATA, run_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (scripts/test.sh installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
MEASURE = """<script>
const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const cards = [...document.querySelectorAll('.card')].map(c => ({
  box: box(c), scroll: c.scrollWidth, client: c.clientWidth,
  inner: [...c.querySelectorAll('table, p, h3')].map(box)}));
const out = document.createElement('pre'); out.id = 'boxes';
out.textContent = JSON.stringify({cards, page: document.documentElement.scrollWidth, view: window.innerWidth});
document.body.appendChild(out);
</script>"""


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("layout")
    uri = str(root / "atlas")
    commit_run(uri, run_rows("r1"), run_id="r1", metadata=METADATA)
    append_validations(uri, pa.Table.from_pylist([
        {"run_id": "r1", "model": "tiny-gpt2", "concept": "royalty", "method": "neat", "ablation": "zero", "k": 5,
         "top_change": 3.5, "random_mean": 0.01, "random_std": 0.02, "z_score": 170.0, "p_value": 1 / 21,
         "draws": 20, "other_changes_json": json.dumps({"music": -1.25}), "neutral_loss_change": 0.002,
         "created_at": datetime.now(timezone.utc), "intervention": "zero", "prompt_change": 0.5,
         "prompt_random_mean": 0.0, "shared_top_k": 0.4}], schema=VALIDATION_SCHEMA))
    out = root / "report.html"
    assert main(["report", "--atlas", uri, "--concept", "royalty", "--out", str(out), "--top", "12"]) == 0
    return out.read_text(encoding="utf-8")


def _render(page: str, width: int, tmp_path) -> dict:
    path = tmp_path / f"page-{width}.html"
    path.write_text(page.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / f'profile-{width}'}",
                           f"--window-size={width},1000", "--dump-dom", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="boxes">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


def _overlap(a, b) -> bool:
    return a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5


@pytest.mark.parametrize("width", [1400, 1024, 768])
def test_passport_cards_hold_their_tables_at_common_widths(report_html, tmp_path, width):
    boxes = _render(report_html, width, tmp_path)
    cards = boxes["cards"]
    assert len(cards) == 12
    for card in cards:
        assert card["scroll"] <= card["client"] + 1, (width, card)  # nothing wider than the card
        for inner in card["inner"]:
            assert inner[0] >= card["box"][0] - 0.5 and inner[2] <= card["box"][2] + 0.5, (width, card, inner)
    for i, a in enumerate(cards):
        for b in cards[i + 1:]:
            assert not _overlap(a["box"], b["box"]), (width, a["box"], b["box"])
    assert boxes["page"] <= boxes["view"], boxes  # no sideways scrolling of the page
