"""The HTML report of one concept in one run (NeuroLens-style): top neurons, a layer x neuron heatmap,
per-layer counts, a scatter, a Sankey of concepts to layer bands, passport cards and validations.
Pure: Arrow tables in, one self-contained HTML string out (inline CSS and SVG, no script, no network).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.contrast import generic_neurons

TOP_K = 100  # the "top-100" of the layer bars, the Sankey, the passports and the generic rule
HEAT_COLUMNS = 128  # heatmap cells per layer row
MAX_BANDS = 8  # Sankey layer bands
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1120px;margin:1.5em auto;padding:0 1em}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .3em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:0 0 .3em}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:.5em 0}dt{color:#666}dd{margin:0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:.15em .6em;border-bottom:1px solid #eee;text-align:right}th{background:#f6f6f6}
td.t,th.t{text-align:left}
.note,.skip{color:#666;font-size:.9em;margin:.2em 0 .5em}.skip{font-style:italic}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,440px),1fr));gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em .8em;font-size:.9em;min-width:0;overflow-x:auto}
.card table{width:100%}.card th,.card td{padding:.1em .35em}.card p{overflow-wrap:anywhere}
.wide{overflow-x:auto;max-width:100%}
.badge{background:#e15759;color:#fff;border-radius:3px;padding:0 .4em;font-size:.8em;font-weight:normal}
svg{display:block;margin:.4em 0;max-width:100%;height:auto}svg text{font-size:10px;fill:#444}
.dots{stroke:#8a8a8a;stroke-opacity:.45;stroke-width:3;stroke-linecap:round;fill:none}
.mark{fill:#e15759;stroke:#fff;stroke-width:1}.axis{stroke:#999;stroke-width:1}
"""


@dataclass(frozen=True)
class ReportData:
    """What a report shows, read from the atlas by jobs/report_command.py."""

    model: str
    revision: str
    run_id: str
    concept: str
    method: str
    ablation: str
    created_at: datetime | None
    block: pa.Table  # every neuron of (concept, method, ablation) in the run: ATLAS_SCHEMA columns
    top_rows: pa.Table  # every row of the run with rank <= TOP_K: all concepts, methods, ablations
    selectivity: pa.Table | None = None  # method "selectivity" rows of the concept (layer, neuron, stats)
    ranges: pa.Table | None = None  # method "neuronlens" rows of the concept (layer, neuron, stats)
    validations: pa.Table | None = None  # VALIDATION_SCHEMA rows of this run and concept, newest first
    metadata: dict = field(default_factory=dict)  # the run's metadata (targets, device, warnings)
    top: int = 20
    # The specific ranking (storage/specificity.py rows of the concept, method and ablation: layer, neuron,
    # specific_rank, specificity, off_target_concept, generic) when the run holds the reference contrast
    # and the report shows it (the default); None: the report ranks by score.
    specific: pa.Table | None = None


def esc(value) -> str:
    """Any value as escaped HTML text (attributes included)."""
    return html.escape(str(value), quote=True)


def num(value, digits: int = 6) -> str:
    """A number as a person reads it: floats to `digits` significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _section(title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return f"<section><h2>{esc(title)}</h2>{note_html}{body}</section>\n"


def _skip(title: str, why: str) -> str:
    return f'<section><h2>{esc(title)}</h2><p class="skip">{esc(why)}</p></section>\n'


def _table(headers: list[str], rows: list[list[str]], text_columns: set[int] = frozenset()) -> str:
    """An HTML table; cells are already-escaped strings."""
    cls = lambda i: ' class="t"' if i in text_columns else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    # Wrapped: a table wider than a narrow window scrolls inside its box instead of widening the page.
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _svg(width: float, height: float, body: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(label)}">{body}</svg>')


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{esc(text)}</text>'


def colour(t: float) -> str:
    """Viridis at t in [0, 1] as #rrggbb (linear between five stops)."""
    t = min(max(float(t), 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    rgb = [round(a + (b - a) * f) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1])]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values inside [lo, hi]: n to 2n of them, in steps of 1, 2 or 5 x 10^k."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = max(m * mag for m in (1, 2, 5) if m * mag <= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round((first + i) * step, 12) for i in range(int(math.floor(hi / step + 1e-9)) - first + 1)]


def _key(table: pa.Table) -> np.ndarray:
    """(layer, neuron) as one int64 per row."""
    return table.column("layer").to_numpy().astype(np.int64) << 32 | table.column("neuron").to_numpy()


def lookup(table: pa.Table | None, keys: list[tuple[int, int]]) -> dict[tuple[int, int], dict]:
    """Rows of `table` for the given (layer, neuron) keys, as dicts."""
    if table is None or table.num_rows == 0 or not keys:
        return {}
    wanted = np.array([layer << 32 | neuron for layer, neuron in keys], dtype=np.int64)
    rows = table.filter(pa.array(np.isin(_key(table), wanted))).to_pylist()
    return {(r["layer"], r["neuron"]): r for r in rows}


# --- SVG builders -------------------------------------------------------------------------------


def heatmap_svg(layers: np.ndarray, neurons: np.ndarray, scores: np.ndarray, *, columns: int = HEAT_COLUMNS) -> str:
    """One row per layer; each cell holds `size` adjacent neurons and shows their max score (sqrt scale)."""
    keep = np.isfinite(scores)
    layers, neurons, scores = layers[keep], neurons[keep].astype(np.int64), scores[keep].astype(np.float64)
    rows = np.unique(layers)
    width = int(neurons.max()) + 1
    size = -(-width // columns)
    ncols = -(-width // size)
    cell = np.searchsorted(rows, layers).astype(np.int64) * ncols + neurons // size
    order = np.argsort(-scores, kind="stable")
    cells, first = np.unique(cell[order], return_index=True)  # each cell's best neuron
    best = order[first]
    vmax = float(scores.max()) if scores.max() > 0 else 1.0
    cw = max(3, min(12, 768 // ncols))
    ch = max(6, min(20, 480 // len(rows)))
    left, top = 40, 6
    grid_w, grid_h = ncols * cw, len(rows) * ch
    parts = [f'<rect x="{left}" y="{top}" width="{grid_w}" height="{grid_h}" fill="#eee"/>']
    for c, i in zip(cells.tolist(), best.tolist()):
        r, col = divmod(c, ncols)
        lo, hi = col * size, min(width, (col + 1) * size) - 1
        tip = f"layer {rows[r]}, neurons {lo}-{hi}: max score {scores[i]:.4g} (neuron {neurons[i]})"
        parts.append(f'<rect x="{left + col * cw}" y="{top + r * ch}" width="{cw}" height="{ch}" '
                     f'fill="{colour(math.sqrt(scores[i] / vmax))}"><title>{esc(tip)}</title></rect>')
    every = max(1, math.ceil(11 / ch))
    for r, layer in enumerate(rows.tolist()):
        if r % every == 0:
            parts.append(_text(left - 4, top + r * ch + ch / 2 + 3.5, f"L{layer}", "end"))
    axis_y = top + grid_h + 12
    for value in (0, width // 2, width - 1):
        parts.append(_text(left + (value // size + 0.5) * cw, axis_y, str(value), "middle"))
    parts.append(_text(left + grid_w / 2, axis_y + 13, f"neuron ({size} per cell)", "middle"))
    legend_y = axis_y + 26
    stops = "".join(f'<stop offset="{i / 4:.2f}" stop-color="{colour(i / 4)}"/>' for i in range(5))
    parts.append(f'<defs><linearGradient id="heat-scale">{stops}</linearGradient></defs>'
                 f'<rect x="{left}" y="{legend_y}" width="240" height="10" fill="url(#heat-scale)"/>')
    for f in (0, 0.25, 0.5, 0.75, 1):
        parts.append(_text(left + 240 * f, legend_y + 22, f"{vmax * f * f:.3g}", "middle"))
    parts.append(_text(left + 250, legend_y + 9, "score (max per cell, square-root colour scale)"))
    return _svg(left + grid_w + 10, legend_y + 30, "".join(parts), "layer by neuron heatmap of the score")


def layer_bars_svg(layers: list[int], counts: list[int], *, k: int = TOP_K) -> str:
    """Vertical bars: how many of the top-k neurons each layer holds."""
    n = len(layers)
    bw = max(6, min(28, 720 // max(n, 1)))
    left, top, plot_h = 36, 14, 150
    peak = max(max(counts, default=0), 1)
    parts = [f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + n * bw}" y2="{top + plot_h}"/>']
    for value in ticks(0, peak, 4):
        y = top + plot_h - plot_h * value / peak
        parts.append(_text(left - 4, y + 3.5, num(value), "end"))
    label_every = max(1, math.ceil(22 / bw))
    for i, (layer, count) in enumerate(zip(layers, counts)):
        h = plot_h * count / peak
        x = left + i * bw
        tip = f"layer {layer}: {count} of the top-{k}"
        parts.append(f'<rect x="{x + 1}" y="{top + plot_h - h:.1f}" width="{bw - 2}" height="{h:.1f}" '
                     f'fill="#4e79a7"><title>{esc(tip)}</title></rect>')
        if count and bw >= 14:
            parts.append(_text(x + bw / 2, top + plot_h - h - 3, str(count), "middle"))
        if i % label_every == 0:
            parts.append(_text(x + bw / 2, top + plot_h + 12, f"L{layer}", "middle"))
    return _svg(left + n * bw + 10, top + plot_h + 20, "".join(parts), f"top-{k} neurons per layer")


def scatter_svg(x: np.ndarray, y: np.ndarray, *, x_label: str, y_label: str,
                marks: list[tuple[float, float, str]]) -> str:
    """Every point as a dot of one SVG path (deduplicated to whole pixels, so tens of thousands of
    neurons stay small); `marks` (x, y, tooltip) drawn on top as circles."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep].astype(np.float64), y[keep].astype(np.float64)
    xs = np.concatenate([x, [m[0] for m in marks]])
    ys = np.concatenate([y, [m[1] for m in marks]])
    (x0, x1), (y0, y1) = _domain(xs), _domain(ys)
    left, top, w, h = 56, 10, 520, 320
    px = lambda v: left + (v - x0) / (x1 - x0) * w  # noqa: E731
    py = lambda v: top + h - (v - y0) / (y1 - y0) * h  # noqa: E731
    parts = [f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fafafa" stroke="#ddd"/>']
    for t in ticks(x0, x1):
        parts.append(_text(px(t), top + h + 13, num(t, 4), "middle"))
    for t in ticks(y0, y1):
        parts.append(_text(left - 4, py(t) + 3.5, num(t, 4), "end"))
    parts.append(_text(left + w / 2, top + h + 28, x_label, "middle"))
    parts.append(_text(14, top + h / 2, y_label, "middle", f' transform="rotate(-90 14 {top + h / 2:.1f})"'))
    pixels = np.unique(np.rint(px(x)).astype(np.int64) << 16 | np.rint(py(y)).astype(np.int64))
    dots = "".join(f"M{p >> 16} {p & 0xFFFF}h0" for p in pixels.tolist())
    if dots:
        parts.append(f'<path class="dots" d="{dots}"/>')
    for mx, my, tip in marks:
        if math.isfinite(mx) and math.isfinite(my):
            parts.append(f'<circle class="mark" cx="{px(mx):.1f}" cy="{py(my):.1f}" r="4"><title>{esc(tip)}</title>'
                         f"</circle>")
    return _svg(left + w + 10, top + h + 36, "".join(parts), f"{y_label} against {x_label}")


def _domain(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return lo - 1.0, hi + 1.0
    pad = (hi - lo) * 0.04
    return lo - pad, hi + pad


def layer_bands(layers: list[int], max_bands: int = MAX_BANDS) -> list[list[int]]:
    """Sorted layers cut into at most `max_bands` consecutive bands of equal size (the last may be short)."""
    size = max(1, -(-len(layers) // max_bands))
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def band_name(band: list[int]) -> str:
    return f"L{band[0]}" if len(band) == 1 else f"L{band[0]}-{band[-1]}"


def sankey_svg(flows: dict[str, list[int]], bands: list[str], *, highlight: str, k: int = TOP_K) -> str:
    """Concepts (left) to layer bands (right); a flow's width is the number of the concept's top-k
    neurons in the band."""
    concepts = list(flows)
    total = sum(sum(v) for v in flows.values())
    gap, node_w, left_x = 8, 12, 150
    height = max(240, 30 * max(len(concepts), len(bands)))
    width = 720
    right_x = width - 120
    scale = (height - 20 - gap * (max(len(concepts), len(bands)) - 1)) / max(total, 1)
    band_totals = [sum(flows[c][j] for c in concepts) for j in range(len(bands))]
    left_y = _stack([sum(flows[c]) * scale for c in concepts], gap, height)
    right_y = _stack([t * scale for t in band_totals], gap, height)
    right_cursor = list(right_y)
    parts = []
    for i, concept in enumerate(concepts):
        fill = PALETTE[i % len(PALETTE)]
        opacity = 0.75 if concept == highlight else 0.3
        y0 = left_y[i]
        for j, count in enumerate(flows[concept]):
            if count == 0:
                continue
            h = count * scale
            y1 = right_cursor[j]
            tip = f"{concept} -> {bands[j]}: {count} of its top-{k}"
            parts.append(f'<path d="{_ribbon(left_x + node_w, y0, right_x, y1, h)}" fill="{fill}" '
                         f'fill-opacity="{opacity}"><title>{esc(tip)}</title></path>')
            y0 += h
            right_cursor[j] += h
        h = sum(flows[concept]) * scale
        parts.append(f'<rect x="{left_x}" y="{left_y[i]:.1f}" width="{node_w}" height="{max(h, 1):.1f}" '
                     f'fill="{fill}"/>')
        weight = ' font-weight="bold"' if concept == highlight else ""
        parts.append(_text(left_x - 5, left_y[i] + h / 2 + 3.5, f"{concept} ({sum(flows[concept])})", "end", weight))
    for j, band in enumerate(bands):
        h = band_totals[j] * scale
        parts.append(f'<rect x="{right_x}" y="{right_y[j]:.1f}" width="{node_w}" height="{max(h, 1):.1f}" '
                     f'fill="#777"/>')
        parts.append(_text(right_x + node_w + 5, right_y[j] + h / 2 + 3.5, f"{band} ({band_totals[j]})"))
    return _svg(width, height, "".join(parts), f"Sankey of each concept's top-{k} neurons across layer bands")


def _stack(heights: list[float], gap: float, total_height: float) -> list[float]:
    """Top y of each node stacked with `gap` between them, centred in `total_height`."""
    used = sum(heights) + gap * (len(heights) - 1)
    y = (total_height - used) / 2
    out = []
    for h in heights:
        out.append(y)
        y += h + gap
    return out


def _ribbon(x0: float, y0: float, x1: float, y1: float, h: float) -> str:
    xm = (x0 + x1) / 2
    return (f"M{x0:.1f} {y0:.1f}C{xm:.1f} {y0:.1f} {xm:.1f} {y1:.1f} {x1:.1f} {y1:.1f}"
            f"L{x1:.1f} {y1 + h:.1f}C{xm:.1f} {y1 + h:.1f} {xm:.1f} {y0 + h:.1f} {x0:.1f} {y0 + h:.1f}Z")


# --- sections -----------------------------------------------------------------------------------


def _concept_meta(data: ReportData) -> dict:
    return next((c for c in data.metadata.get("concepts", []) if isinstance(c, dict) and c.get("name") == data.concept),
                {})


def _header(data: ReportData) -> str:
    layers = np.unique(data.block.column("layer").to_numpy())
    when = data.created_at.strftime("%Y-%m-%d %H:%M UTC") if data.created_at else "unknown"
    items = [("model", data.model), ("revision", data.revision), ("run", data.run_id), ("method", data.method),
             ("ablation", data.ablation), ("concept", data.concept),
             ("neurons scored", f"{data.block.num_rows:,} in {len(layers)} layers"), ("committed", when)]
    meta = _concept_meta(data)
    if meta.get("target_words"):
        targets = ", ".join(map(str, meta["target_words"]))
        if isinstance(meta.get("base_log_p"), (int, float)):
            targets += f" (base log p(T) {meta['base_log_p']:.4g})"
        items.append(("targets", targets))
    if data.metadata.get("device") or data.metadata.get("dtype"):
        items.append(("device", f"{data.metadata.get('device', '?')}, {data.metadata.get('dtype', '?')}"))
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    warnings = [str(w) for w in data.metadata.get("warnings", []) or []]
    warn = "".join(f'<p class="note">warning: {esc(w)}</p>' for w in warnings[:10])
    return (f"<header><h1>{esc(data.concept)} in run {esc(data.run_id)}</h1>"
            f'<p class="note">neuron-atlas report: where the concept lives in {esc(data.model)}</p>'
            f"<dl>{rows}</dl>{warn}</header>\n")


def _top_table(data: ReportData, top: list[dict]) -> str:
    keys = [(r["layer"], r["neuron"]) for r in top]
    sel, ranges = lookup(data.selectivity, keys), lookup(data.ranges, keys)
    rows, shown = [], []
    for r in top:
        key = (r["layer"], r["neuron"])
        sources = (r, ranges.get(key, {}), sel.get(key, {}))  # own row first, then neuronlens, then selectivity
        stats = {name: next((s[name] for s in sources if s.get(name) is not None), None) for name in
                 ("selectivity", "consistency", "act_mean", "act_std", "range_low", "range_high")}
        low, high = stats.pop("range_low"), stats.pop("range_high")
        stats["range"] = f"[{num(low, 4)}, {num(high, 4)}]" if low is not None and high is not None else None
        shown.append(stats)
        rows.append([num(r["rank"]), num(r["layer"]), num(r["neuron"]), num(r["score"]), num(r["effect"]),
                     num(r["activation"])])
    names = [name for name in ("selectivity", "consistency", "act_mean", "act_std", "range")
             if any(s[name] is not None for s in shown)]
    for row, stats in zip(rows, shown):
        row.extend(esc(stats[n]) if n == "range" and stats[n] else num(stats[n], 4) for n in names)
    headers = ["rank", "layer", "neuron", "score", "effect", "activation"] + names
    note = f"the {len(top)} highest-ranked neurons by {data.method} ({data.ablation})"
    if data.specific is not None:  # the specific ranking: its rank first, the raw rank stays as "rank"
        for row, r in zip(rows, top):
            row[:0] = [num(r["specific_rank"])]
            row.extend([num(r["specificity"], 4), esc(r["off_target_concept"])])
        headers = ["specific rank"] + headers + ["specificity", "most moved other concept"]
        note = (f"the {len(top)} neurons of the specific ranking ({data.method}, {data.ablation}): a set that moves "
                f"{data.concept} much more than any reference or other run concept; rank: the raw {data.method} rank")
        from jobs.specific_query import measured_set_text

        measured = measured_set_text(data.metadata or {}, concept=data.concept, ablation=data.ablation)
        if measured:
            note += "; " + measured.replace("`", "")  # no markdown in the page
    if names:
        note += "; statistics from methods selectivity and neuronlens when the run holds them"
    return _section(f"Top {len(top)} neurons", _table(headers, rows), note)


def _heatmap_section(data: ReportData) -> str:
    title = "Score by layer and neuron"
    scores = data.block.column("score").to_numpy(zero_copy_only=False)
    if not np.isfinite(scores).any():
        return _skip(title, "no finite scores in this run for the concept")
    svg = heatmap_svg(data.block.column("layer").to_numpy(), data.block.column("neuron").to_numpy(), scores)
    return _section(title, svg, "each cell: the highest score among its neurons; hover for the neuron")


def _bars_section(data: ReportData) -> str:
    layers = sorted(set(data.block.column("layer").to_pylist()))
    ranks = data.block.column("rank").to_numpy()
    held = data.block.column("layer").to_numpy()[ranks <= TOP_K]
    counts = [int((held == layer).sum()) for layer in layers]
    return _section(f"Top-{TOP_K} neurons per layer", layer_bars_svg(layers, counts),
                    f"how many of the concept's top-{TOP_K} neurons each layer holds")


def _scatter_section(data: ReportData, top: list[dict]) -> str:
    keys = [(r["layer"], r["neuron"]) for r in top]
    sel = data.selectivity
    if sel is not None and sel.num_rows and sel.column("selectivity").null_count < sel.num_rows:
        title, source, xs, ys = "Selectivity vs consistency", sel, "selectivity", "consistency"
        note = (f"every neuron of method selectivity for {data.concept}; red: the top {len(top)} by "
                f"{data.method}")
    else:
        title, source, xs, ys = "Effect vs activation", data.block, "effect", "activation"
        note = (f"every neuron of {data.method} ({data.ablation}); red: the top {len(top)}; the run has no "
                f"selectivity scores for {data.concept}")
        if source.column("activation").null_count == source.num_rows:
            return _skip(title, f"no activations recorded by {data.method} and no selectivity scores")
    found = lookup(source, keys)
    marks = []
    for r in top:
        hit = found.get((r["layer"], r["neuron"]))
        if hit and hit[xs] is not None and hit[ys] is not None:
            tip = f"rank {r['rank']}: layer {r['layer']}, neuron {r['neuron']}; {xs} {hit[xs]:.4g}, {ys} {hit[ys]:.4g}"
            marks.append((hit[xs], hit[ys], tip))
    x = source.column(xs).to_numpy(zero_copy_only=False).astype(np.float64)
    y = source.column(ys).to_numpy(zero_copy_only=False).astype(np.float64)
    return _section(title, scatter_svg(x, y, x_label=xs, y_label=ys, marks=marks), note)


def _sankey_section(data: ReportData) -> str:
    title = "Concepts across layers"
    rows = _method_rows(data)
    concepts = sorted(set(rows.column("concept").to_pylist()))
    layers = sorted(set(data.block.column("layer").to_pylist()))
    bands = layer_bands(layers)
    band_of = {layer: j for j, band in enumerate(bands) for layer in band}
    flows = {c: [0] * len(bands) for c in concepts}
    for concept, layer in zip(rows.column("concept").to_pylist(), rows.column("layer").to_pylist()):
        if layer in band_of:
            flows[concept][band_of[layer]] += 1
    if not any(sum(v) for v in flows.values()):
        return _skip(title, f"no top-{TOP_K} rows of {data.method} ({data.ablation}) in this run")
    note = (f"each concept of the run ({data.method}, {data.ablation}) to the layer bands holding its top-"
            f"{TOP_K} neurons; shared bands are where concepts overlap")
    return _section(title, sankey_svg(flows, [band_name(b) for b in bands], highlight=data.concept), note)


def _method_rows(data: ReportData) -> pa.Table:
    """The run's top-k rows of the report's method and ablation (all concepts)."""
    rows = data.top_rows
    keep = pc.and_(pc.equal(rows.column("method"), data.method), pc.equal(rows.column("ablation"), data.ablation))
    return rows.filter(keep)


def _generic_keys(data: ReportData) -> set[tuple[int, int]]:
    """Neurons in the top-k of every concept of the run (method and ablation of the report)."""
    rows = _method_rows(data)
    if len(set(rows.column("concept").to_pylist())) < 2 and data.specific is None:
        return set()
    generic = generic_neurons(rows, k=TOP_K) if len(set(rows.column("concept").to_pylist())) > 1 else rows.slice(0, 0)
    keys = {(r["layer"], r["neuron"]) for r in generic.to_pylist()}
    if data.specific is not None:  # generic against the reference set too (storage/specificity.py)
        flagged = data.specific.filter(data.specific.column("generic"))
        keys |= set(zip(flagged.column("layer").to_pylist(), flagged.column("neuron").to_pylist()))
    return keys


def _passport_section(data: ReportData, top: list[dict]) -> str:
    generic = _generic_keys(data)
    keys = {(r["layer"], r["neuron"]) for r in top}
    by_neuron: dict[tuple[int, int], list[dict]] = {}
    for row in data.top_rows.to_pylist():
        if (row["layer"], row["neuron"]) in keys:
            by_neuron.setdefault((row["layer"], row["neuron"]), []).append(row)
    ranges = lookup(data.ranges, sorted(keys))
    cards = [_card(data, r, by_neuron.get((r["layer"], r["neuron"]), []), (r["layer"], r["neuron"]) in generic,
                   ranges.get((r["layer"], r["neuron"]))) for r in top]
    note = (f"for each top neuron: every concept and method of the run where it ranks in the top-{TOP_K}; "
            f"generic: in the top-{TOP_K} of every concept ({data.method}, {data.ablation})")
    return _section("Neuron passports", f'<div class="cards">{"".join(cards)}</div>', note)


def _card(data: ReportData, row: dict, entries: list[dict], generic: bool, lens: dict | None) -> str:
    badge = (f' <span class="badge" title="in the top-{TOP_K} of every concept of this run">generic</span>'
             if generic else "")
    head = f"<h3>layer {esc(row['layer'])} · neuron {esc(row['neuron'])}{badge}</h3>"
    line = (f"<p>rank {esc(row['rank'])} for {esc(data.concept)} ({esc(data.method)}, {esc(data.ablation)}): "
            f"score {num(row['score'], 4)}, effect {num(row['effect'], 4)}, activation {num(row['activation'], 4)}</p>")
    if lens and lens.get("range_low") is not None and lens.get("range_high") is not None:
        line += (f"<p>NeuronLens range for {esc(data.concept)}: [{num(lens['range_low'], 4)}, "
                 f"{num(lens['range_high'], 4)}]</p>")
    entries = sorted(entries, key=lambda e: (e["rank"], e["concept"], e["method"], e["ablation"]))
    rows = []
    for e in entries:
        span = (f"[{num(e['range_low'], 4)}, {num(e['range_high'], 4)}]"
                if e.get("range_low") is not None and e.get("range_high") is not None else "")
        rows.append([esc(e["concept"]), esc(e["method"]), esc(e["ablation"]), num(e["rank"]), num(e["effect"], 4),
                     num(e["activation"], 4), span])
    table = _table(["concept", "method", "ablation", "rank", "effect", "activation", "range"], rows, {0, 1, 2})
    return f'<div class="card">{head}{line}{table}</div>'


def _validation_section(data: ReportData) -> str:
    title = "Validation"
    rows = data.validations
    if rows is None or rows.num_rows == 0:
        return _skip(title, f"no validation of {data.concept} in run {data.run_id} yet "
                            f"(neuron-atlas validate --concept {data.concept} --run {data.run_id})")
    seen, shown = set(), []
    for r in rows.to_pylist():  # newest first: keep the newest per (method, ablation, intervention, k)
        key = (r["method"], r["ablation"], r.get("intervention"), r["k"])
        if key in seen:
            continue
        seen.add(key)
        shown.append([esc(r["method"]), esc(r["ablation"]), esc(r.get("intervention") or ""), num(r["k"]),
                      num(r["top_change"], 4),
                      f"{num(r['random_mean'], 3)} ± {num(r['random_std'], 3)}", num(r["z_score"], 3),
                      num(r["p_value"], 3), num(r["draws"]), num(r.get("prompt_change"), 4),
                      num(r.get("shared_top_k"), 2), esc(_most_moved(r.get("other_changes_json"))),
                      num(r["neutral_loss_change"], 3),
                      esc(r["created_at"].strftime("%Y-%m-%d %H:%M") if r.get("created_at") else "")])
    headers = ["method", "ablation", "set to", "k", "top-k change", "random", "z", "p", "draws", "prompt change",
               "shared top-k", "most-moved other", "neutral loss change", "when (UTC)"]
    note = ("log p(T) change in nats when the top-k are ablated together (set to: the intervention), against "
            "random k-neuron sets; prompt change: log p(gold) on the concept's prompts; shared top-k: share of "
            "the top-k also top-k for another concept")
    return _section(title, _table(headers, shown, {0, 1, 2, 11}), note)


def _most_moved(other_json: str | None) -> str:
    try:
        other = json.loads(other_json or "{}")
    except ValueError:
        return ""
    if not other:
        return ""
    name, change = max(other.items(), key=lambda item: abs(item[1]))
    return f"{name} {change:+.3f}"


def top_neuron_rows(data: ReportData) -> list[dict]:
    """The report's top-N neurons (by specific rank when the report shows that ranking, else by rank) as dicts."""
    block = data.block
    if data.specific is not None:
        order = data.specific.filter(pc.less_equal(data.specific.column("specific_rank"), data.top))
        by_key = {(r["layer"], r["neuron"]): r for r in block.to_pylist()}
        return [{**by_key[(r["layer"], r["neuron"])], "specific_rank": r["specific_rank"],
                 "specificity": r["specificity"], "off_target_concept": r["off_target_concept"]}
                for r in order.sort_by("specific_rank").to_pylist() if (r["layer"], r["neuron"]) in by_key]
    head = block.filter(pc.less_equal(block.column("rank"), data.top)).sort_by("rank")
    return head.to_pylist()


def render_report(data: ReportData) -> str:
    """The whole report as one HTML document."""
    top = top_neuron_rows(data)
    body = "".join([
        _header(data),
        _top_table(data, top),
        _heatmap_section(data),
        _bars_section(data),
        _scatter_section(data, top),
        _sankey_section(data),
        _passport_section(data, top),
        _validation_section(data),
    ])
    title = f"{data.concept} in run {data.run_id} - neuron-atlas report"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body>\n{body}</body></html>\n")
