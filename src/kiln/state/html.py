"""build/<model>/report.html and build/index.html: what a build left (report.json, kiln.lock.json,
each target's validation.json, the calibrate steps' calibration.json) drawn as one self-contained
page per manifest: no script, no stylesheet or font fetched, every plot an inline SVG made here.

Deterministic: the same files give the same bytes (sorted inputs, rounded coordinates, no clock
read here; the only time shown is the report's own generated_at), so a no-op build rewrites the
page only where report.json changed. Every name shown comes from a user's manifest: all text goes
through html.escape.

Plots (each an <svg class="plot" id="plot-...">):
- trade-off: artifact size (x, log) against the worst output's 1 - min cosine (y, log), the dot's
  area the measured median latency;
- errors: per output, max |diff| and 1 - min cosine per target against the gates;
- distributions: per output, a row per target of two histograms of its rows' errors (1 - cosine and
  max |diff|, log bins) with the target's gate, from validation.json's "distributions" (written by
  the validate rule since its version 5; an older build's targets get a note);
- calibration: per observed tensor of each calibrate step, the |x| histogram with the clipping
  threshold every method (minmax, percentile, entropy) derives from it, by the quantize rules' own
  function (kiln.build_rules.quantize_static.activation_ranges), and the range each static target
  really used (its quantize step's "ranges");
- timeline: each step's start and duration (laid end to end in plan order when the report has no
  start times) and, when the report has them, CPU time, peak RSS against the step's memory
  reservation, and the report's memory warnings;
- changes since the previous build: a table per target (bytes, digest or step key, metrics, latency).

A quantized target's latency cell has its ratio to the same format's fp32 artifact (the report's
"latency_vs_fp32", red when slower); a target whose quantize step kept layers in float (its
"fallback") gets a table of those layers with each one's effect alone, and the trials of the search.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kiln.base.fsio import read_json, write_bytes_atomic
from kiln.state.report import ratio_text, slower_warning

CALIBRATE_RULES = ("calibrate", "calibrate_tflite")
QUANTIZE_RULES = ("quantize_static", "quantize_tflite")
METHODS = ("minmax", "percentile", "entropy")
METHOD_COLORS = {"minmax": "#d62728", "percentile": "#ff7f0e", "entropy": "#2ca02c"}
MAX_HISTOGRAMS = 12  # per calibrate step: a transformer has ~70 observed tensors, a page of 70 charts helps nobody
HISTOGRAM_BARS = 64  # the 2048 calibration bins summed into this many bars
TINY = 1e-16  # the floor of log-scale error axes (an error of exactly 0 sits there)
# What a step cost, in its report entry (kiln.state.report): this build's run without a prefix,
# the most recent run (maybe an earlier build's) with it. Older reports have none of them.
LAST_RUN = "last_run_"

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#cf222e}.muted{color:#666}.small{font-size:12px}
svg.plot{display:block;margin:8px 0;background:#fff;border:1px solid #eee}
svg text{font:11px system-ui,sans-serif;fill:#333}
.grid{display:flex;flex-wrap:wrap;gap:8px}
"""


def write_model_html(build_dir: Path, model: str, previous_report: dict | None) -> Path:
    """Write build_dir/<model>/report.html from build_dir/<model>/report.json and the files beside
    it; previous_report: the report.json this build replaced (None: no "changes" section)."""
    report = read_json(build_dir / model / "report.json")
    if report is None:
        raise FileNotFoundError(f"{build_dir / model / 'report.json'}: no report to draw (the build has not finished)")
    page = model_page(build_dir.parent, report, read_json(build_dir / model / "kiln.lock.json"), previous_report)
    path = build_dir / model / "report.html"
    write_bytes_atomic(path, page.encode())
    return path


def write_index_html(build_root: Path) -> Path:
    """Write build_root/index.html: one row per target of every manifest built under build_root,
    each model linking to its report.html."""
    models = []
    for folder in sorted(p for p in build_root.iterdir() if p.is_dir()) if build_root.is_dir() else []:
        report = read_json(folder / "report.json")
        if report is not None:
            models.append((folder.name, report))
    path = build_root / "index.html"
    write_bytes_atomic(path, index_page(models).encode())
    return path


# ---------------------------------------------------------------- pages


def model_page(root: Path, report: dict, lock: dict | None, previous: dict | None) -> str:
    model = str(report.get("model", "?"))
    targets = target_rows(root, report, lock)
    sections = [
        _header(report),
        _section("Targets", targets_table(targets, report.get("skipped") or [])),
        _section("Size, accuracy and latency", tradeoff_plot(targets)),
        _section("Error against the source, per output", errors_section(targets)),
        _section("Error distributions over rows, per output", distributions_section(targets)),
        *([_section("Layers kept in higher precision", fallback_section(targets))] if any(isinstance(t.get("fallback"), dict) for t in targets) else []),
        _section("Calibration", calibration_section(root, report)),
        _section("Step timeline", timeline_section(report.get("steps") or [], report.get("warnings") or [])),
        _section("Changes since the previous build", changes_section(report, previous, targets)),
    ]
    if lock and lock.get("tools"):
        sections.append(_section("Tools", tools_table(lock["tools"])))
    return _document(f"kiln: {model}", "".join(sections))


def index_page(models: list[tuple[str, dict]]) -> str:
    rows = []
    for name, report in models:
        link = f'<a href="{_attr(quote(name))}/report.html">{_e(name)}</a>'
        artifacts = report.get("artifacts") or []
        status = _status_html(report.get("ok"))
        if not artifacts:
            rows.append(f"<tr><td>{link}</td><td>{status}</td><td colspan=7 class=muted>no targets</td></tr>")
        for artifact in artifacts:
            worst = worst_cosine(artifact.get("metrics"))
            rows.append(
                f"<tr><td>{link}</td><td>{status}</td><td>{_e(artifact.get('target'))}</td><td>{_e(_format_of(artifact))}</td><td>{_e(artifact.get('status'))}</td>"
                f"<td class=n>{_bytes(artifact.get('bytes'))}</td><td class=n>{_latency_cell(artifact)}</td>"
                f"<td class=n>{_num(_one_minus(worst), 3)}</td><td>{_gate_html(artifact)}</td></tr>")
    table = ("<table><tr><th>model</th><th>build</th><th>target</th><th>format</th><th>step</th><th>bytes</th><th>latency</th>"
             "<th>1 − worst cosine</th><th>gate</th></tr>" + "".join(rows) + "</table>") if rows else "<p class=muted>no build yet</p>"
    return _document("kiln builds", f"<h1>kiln builds</h1><p class=muted>{len(models)} manifests</p>{table}")


# ---------------------------------------------------------------- targets


def target_rows(root: Path, report: dict, lock: dict | None) -> list[dict[str, Any]]:
    """One dict per artifact of the report, its metrics from its validation.json (the report's own,
    from the step's record or failure, when there is none) and its sha256 from the lockfile."""
    digests = {a.get("target"): a.get("sha256") for a in (lock or {}).get("artifacts", [])}
    rows = []
    for artifact in report.get("artifacts") or []:
        row = dict(artifact)
        validation = _validation_of(root, artifact)
        if validation is not None:
            row["metrics"] = validation.get("metrics", row.get("metrics"))
            row["thresholds"] = validation.get("thresholds", row.get("thresholds"))
            row["samples"] = validation.get("samples")
            row["distributions"] = validation.get("distributions")
        # the lockfile is written by a build that passed only: after a failure it holds the last good artifact's
        row["sha256"] = digests.get(artifact.get("target")) if artifact.get("status") != "failed" else None
        rows.append(row)
    return rows


def _validation_of(root: Path, artifact: dict) -> dict | None:
    """The validation.json published beside the artifact. None for a target that failed this build:
    the file there is the last good build's, and its metrics must not stand in for this build's."""
    if artifact.get("status") == "failed" or not artifact.get("path"):
        return None
    return read_json(root / Path(artifact["path"]).parent / "validation.json")


def worst_cosine(metrics: dict | None) -> float | None:
    """The lowest min_cosine over the outputs; NaN when any output's is NaN (min alone keeps or
    drops a NaN by its position, and a broken output must not hide behind a good one)."""
    values = [m["min_cosine"] for m in (metrics or {}).values() if isinstance(m, dict) and isinstance(m.get("min_cosine"), (int, float))]
    if any(math.isnan(v) for v in values):
        return math.nan
    return min(values) if values else None


def has_nonfinite(metrics: dict | None) -> bool:
    """A NaN or infinite value among the metrics, gated or not."""
    return any(isinstance(v, float) and not math.isfinite(v) for m in (metrics or {}).values() if isinstance(m, dict) for v in m.values())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _format_of(artifact: dict) -> str:
    """"onnx fp16": the artifact's format and precision, when the report names them."""
    return " ".join(str(artifact[k]) for k in ("format", "precision") if artifact.get(k))


def median_ms(latency: dict | None) -> float | None:
    value = (latency or {}).get("median_ms")
    return float(value) if isinstance(value, (int, float)) else None


def targets_table(targets: list[dict], skipped: list[dict]) -> str:
    if not targets and not skipped:
        return "<p class=muted>no targets</p>"
    rows = []
    for t in targets:
        note = t.get("validation") or ""
        rows.append(
            f"<tr><td>{_e(t.get('target'))}</td><td>{_e(_format_of(t))}</td><td>{_e(t.get('status'))}</td><td class=n>{_bytes(t.get('bytes'))}</td>"
            f"<td class=n>{_latency_cell(t)}</td><td class=n>{_num(_one_minus(worst_cosine(t.get('metrics'))), 3)}</td>"
            f"<td>{_gate_html(t)}</td><td class=small>{_e(note)}</td>"
            f"<td class=small><code>{_e((t.get('sha256') or '')[:12])}</code></td></tr>")
    for s in skipped:
        rows.append(f"<tr><td>{_e(s.get('target'))}</td><td></td><td>skipped</td><td colspan=6 class=small>{_e(s.get('why'))}</td></tr>")
    slower = [w for w in (slower_warning(t, t.get("precision")) for t in targets) if w]  # a quantization that costs speed is news
    notes = "<ul class=bad>" + "".join(f"<li>{_e(w)}</li>" for w in slower) + "</ul>" if slower else ""
    return ("<table><tr><th>target</th><th>format</th><th>step</th><th>bytes</th><th>latency (median)</th><th>1 − worst cosine</th><th>gate</th>"
            "<th>validation</th><th>sha256</th></tr>" + "".join(rows) + "</table>" + notes)


# ---------------------------------------------------------------- trade-off plot


def tradeoff_plot(targets: list[dict]) -> str:
    """Size (x, log) against 1 - worst cosine (y, log, best at the top); dot area ~ median latency.
    Targets without metrics (structural checks only) sit on a line below the axis, hollow."""
    points = [(str(t.get("target")), float(t["bytes"]), worst_cosine(t.get("metrics")), median_ms(t.get("latency")))
              for t in targets if _finite(t.get("bytes")) and t["bytes"] > 0]
    points = [(name, size, cosine, latency if _finite(latency) else None) for name, size, cosine, latency in points]
    if not points:
        return "<p class=muted>no artifact has a size yet</p>"
    w, h, left, right, top, bottom = 720, 380, 70, 170, 20, 70
    xs = [math.log10(p[1]) for p in points]
    errors = [max(1.0 - p[2], TINY) for p in points if _finite(p[2])]
    ys = [math.log10(e) for e in errors] or [0.0]
    x0, x1 = _padded(min(xs), max(xs))
    y0, y1 = _padded(math.floor(min(ys)), math.ceil(max(ys)))
    slowest = max((p[3] for p in points if p[3] is not None), default=None)

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (w - left - right)

    def py(v: float) -> float:  # small error at the top
        return top + (v - y0) / (y1 - y0) * (h - top - bottom - 24)

    body = [_axes(left, top, w - right, h - bottom - 24)]
    body += [_tick_x(px(v), h - bottom - 24, _bytes(10 ** v)) for v in _decades(x0, x1)]
    body += [_tick_y(left, py(v), f"1e{v}") for v in _decades(y0, y1)]
    body.append(_text(w - right, h - bottom + 2, "artifact size (log)", anchor="end"))
    body.append(_text(14, top + 8, "1 − worst cosine (log, better ↑)", rotate=True))
    no_metrics_y = h - bottom
    body.append(_text(left - 6, no_metrics_y + 4, "no metrics", anchor="end", cls="muted"))
    nonfinite_y = top - 6  # a NaN cosine has no place on a log axis: a marked line above it
    if any(p[2] is not None and not _finite(p[2]) for p in points):
        body.append(_text(left - 6, nonfinite_y + 4, "nonfinite", anchor="end", fill="#cf222e"))
    for i, (name, size, cosine, latency) in enumerate(points):
        x = px(math.log10(size))
        y = no_metrics_y if cosine is None else py(math.log10(max(1.0 - cosine, TINY))) if _finite(cosine) else nonfinite_y
        r = 4 + (10 * math.sqrt(latency / slowest) if latency and slowest else 0)
        color = _palette(i)
        fill = f'fill="{color}" fill-opacity="0.6"' if _finite(cosine) else 'fill="none"'
        tip = f"{name}: {_bytes(size)}, worst cosine {_num(cosine, 8)}, latency {_ms(latency)}"
        body.append(f'<circle cx="{_c(x)}" cy="{_c(y)}" r="{_c(r)}" {fill} stroke="{color}"><title>{_e(tip)}</title></circle>')
        body.append(_text(x + r + 3, y + 4, name))
    body.append(_text(left, h - 12, f"dot area: median latency (largest {_ms(slowest)}); hollow: no metrics (checked structurally or not validated)", cls="muted"))
    return _svg("plot-tradeoff", w, h, "".join(body), "artifact size against accuracy and latency per target")


# ---------------------------------------------------------------- errors per output


def errors_section(targets: list[dict]) -> str:
    outputs = sorted({name for t in targets for name in (t.get("metrics") or {})})
    if not outputs:
        return "<p class=muted>no target has validation metrics (nothing was run against the source)</p>"
    parts = ["<p class=small>Per output: the worst absolute difference and 1 − the lowest row cosine against the "
             "source's reference outputs (validation.json), on log scales; a tick marks the target's gate. "
             "How the rows spread is drawn under Error distributions.</p>"]
    for output in outputs:
        rows = []
        for t in targets:
            m = (t.get("metrics") or {}).get(output)
            if isinstance(m, dict):
                gates = t.get("thresholds") or {}
                cos_gate = gates.get("min_cosine")
                rows.append((str(t.get("target")), m.get("max_abs_diff"), gates.get("max_abs_diff"),
                             _one_minus(m.get("min_cosine")), _one_minus(cos_gate)))
        parts.append(f"<h3>{_e(output)}</h3>")
        parts.append(error_bars(f"plot-errors-{_slug(output)}", rows))
        parts.append(metrics_table(output, targets))
    return "".join(parts)


# ---------------------------------------------------------------- error distributions per output


def distributions_section(targets: list[dict]) -> str:
    """Per output, one plot of a row per target: histograms of its rows' 1 - cosine and max |diff|."""
    outputs = sorted({name for t in targets for name in (t.get("metrics") or {})})
    if not outputs:
        return "<p class=muted>no target has validation metrics</p>"
    if not any(isinstance(t.get("distributions"), dict) for t in targets):
        return ("<p class=muted>no target's validation.json has error distributions (built before kiln stored "
                "them, or not run against the source): rebuild to see them</p>")
    parts = ["<p class=small>Per output and target: how many rows (tokens or samples) have each error, on log "
             "bins of two per decade; the first bar counts rows of exactly 0, the last those of 1e2 or more; "
             "a red line marks the target's gate (min_cosine, max_abs_diff).</p>"]
    for output in outputs:
        rows = [(str(t.get("target")), (t.get("distributions") or {}).get(output), t.get("thresholds") or {})
                for t in targets if isinstance((t.get("metrics") or {}).get(output), dict)]
        parts.append(f"<h3>{_e(output)}</h3>")
        parts.append(distribution_rows(f"plot-distributions-{_slug(output)}", output, rows))
    return "".join(parts)


def distribution_rows(plot_id: str, output: str, rows: list[tuple[str, dict | None, dict]]) -> str:
    """A row per target of two histogram panels; a target without a stored distribution gets a note."""
    label_w, panel_w, row_h, top = 150, 360, 78, 22
    w, h = label_w + 2 * panel_w + 40, top + row_h * len(rows) + 6
    body = [_text(label_w + p * (panel_w + 20), 14, title) for p, title in enumerate(("1 − cosine per row (log)", "max |diff| per row (log)"))]
    for i, (name, dist, gates) in enumerate(rows):
        y = top + i * row_h
        body.append(_text(label_w - 6, y + 30, _clip(name, 22), anchor="end"))
        if not _drawable(dist):
            body.append(_text(label_w, y + 30, "no distribution stored (built before kiln stored them)", cls="muted"))
            continue
        cos_gate = gates.get("min_cosine")
        for p, (key, gate) in enumerate((("one_minus_cosine", _one_minus(cos_gate)), ("max_abs_diff", gates.get("max_abs_diff")))):
            body.append(_histogram_panel(label_w + p * (panel_w + 20), y, panel_w - 20, row_h - 30, dist["edges"], dist.get(key) or {}, gate, f"{name} {key}"))
    return _svg(plot_id, w, h, "".join(body), f"error distributions of {output}")


def _drawable(dist: Any) -> bool:
    """A stored distribution this page can draw: ascending positive edges (the log axis)."""
    edges = dist.get("edges") if isinstance(dist, dict) else None
    return (isinstance(edges, list) and len(edges) >= 2 and all(_finite(e) and e > 0 for e in edges)
            and all(a < b for a, b in zip(edges, edges[1:], strict=False)))


def _histogram_panel(x: float, y: float, width: float, height: float, edges: list, hist: dict, gate: Any, tip: str) -> str:
    """Bars of one histogram: a slot for exact zeros, one per bin, one for the overflow; the x axis
    is log10 of the edges, labelled every second decade; NaN and underflow rows are counted in text."""
    counts = [hist.get("zero", 0), *(hist.get("counts") or []), hist.get("overflow", 0)]
    counts = [c if isinstance(c, int) and not isinstance(c, bool) else 0 for c in counts]
    slot = width / len(counts)
    tallest = max(counts) or 1
    lo, hi = math.log10(edges[0]), math.log10(edges[-1])

    def px(log_value: float) -> float:  # the bins' span lies between the zero slot and the overflow slot
        return x + slot + (min(max(log_value, lo), hi) - lo) / (hi - lo) * (width - 2 * slot)

    labels = ["0", *(f"[{_num(a, 3)}, {_num(b, 3)})" for a, b in zip(edges, edges[1:], strict=False)), f"≥ {_num(edges[-1], 3)}"]
    body = [_axes(x, y, x + width, y + height)]
    for k, count in enumerate(counts):
        if count:
            bh = count / tallest * height
            body.append(f'<rect x="{_c(x + k * slot)}" y="{_c(y + height - bh)}" width="{_c(max(slot - 1, 0.5))}" height="{_c(bh)}" '
                        f'fill="{"#cf222e" if k == len(counts) - 1 else "#4c78a8"}"><title>{_e(tip)} {_e(labels[k])}: {count} rows</title></rect>')
    for d in range(math.ceil(lo), math.floor(hi) + 1):
        body.append(f'<line x1="{_c(px(d))}" y1="{_c(y + height)}" x2="{_c(px(d))}" y2="{_c(y + height + 3)}" stroke="#888"/>')
        if d % 2 == 0:
            body.append(_text(px(d), y + height + 14, f"1e{d}", anchor="middle", cls="muted"))
    if _finite(gate):
        gx = px(math.log10(gate)) if gate > 0 else x + slot
        body.append(f'<line x1="{_c(gx)}" y1="{_c(y - 2)}" x2="{_c(gx)}" y2="{_c(y + height)}" stroke="#cf222e" stroke-dasharray="3 2">'
                    f"<title>gate {_num(gate, 6)}</title></line>")
    extra = [f"{hist[k]} {words}" for k, words in (("nan", "NaN"), ("underflow", f"nonzero below {_num(edges[0], 3)}"))
             if isinstance(hist.get(k), int) and hist[k]]
    if extra:
        body.append(_text(x + width, y + 8, ", ".join(extra), anchor="end", fill="#cf222e" if hist.get("nan") else ""))
    return "".join(body)


def error_bars(plot_id: str, rows: list[tuple]) -> str:
    """Two panels of horizontal log-scale bars, one row per target: max |diff| and 1 - min cosine."""
    label_w, panel_w, row_h, top = 150, 360, 18, 28
    h = top + row_h * len(rows) + 30
    w = label_w + 2 * panel_w + 40
    body = []
    for i, (name, *_rest) in enumerate(rows):
        body.append(_text(label_w - 6, top + i * row_h + 13, name, anchor="end"))
    for panel, (title, value_at, gate_at) in enumerate((("max |diff|", 1, 2), ("1 − min cosine", 3, 4))):
        x_left = label_w + panel * (panel_w + 20)
        values = [r[value_at] for r in rows] + [r[gate_at] for r in rows]
        logs = [math.log10(max(v, TINY)) for v in values if _finite(v)] or [0.0]
        lo, hi = _padded(math.floor(min(logs)), math.ceil(max(logs)))
        width = panel_w - 20

        def px(v: float, lo=lo, hi=hi, x_left=x_left, width=width) -> float:
            return x_left + (math.log10(max(v, TINY)) - lo) / (hi - lo) * width

        body.append(_text(x_left, 14, title + " (log)"))
        body.append(_axes(x_left, top - 4, x_left + width, top + row_h * len(rows)))
        body += [_tick_x(px(10.0 ** d), top + row_h * len(rows), f"1e{d}") for d in _decades(lo, hi)]
        for i, row in enumerate(rows):
            value, gate, y = row[value_at], row[gate_at], top + i * row_h
            if isinstance(value, (int, float)) and not _finite(value):  # NaN or inf: no bar length, a marker
                body.append(_text(x_left + 4, y + 13, f"nonfinite ({_num(value, 6)})", fill="#cf222e"))
            elif isinstance(value, (int, float)):
                body.append(f'<rect x="{_c(x_left)}" y="{_c(y + 3)}" width="{_c(max(px(value) - x_left, 1))}" height="{row_h - 6}" fill="{_palette(i)}">'
                            f"<title>{_e(row[0])}: {_num(value, 6)}</title></rect>")
            if _finite(gate):
                gx = px(gate)
                body.append(f'<line x1="{_c(gx)}" y1="{_c(y + 1)}" x2="{_c(gx)}" y2="{_c(y + row_h - 1)}" stroke="#cf222e" stroke-width="2">'
                            f"<title>gate {_num(gate, 6)}</title></line>")
    return _svg(plot_id, w, h, "".join(body), "errors against the source per target")


def metrics_table(output: str, targets: list[dict]) -> str:
    names = sorted({k for t in targets for k in ((t.get("metrics") or {}).get(output) or {})})
    rows = []
    for t in targets:
        m = (t.get("metrics") or {}).get(output)
        if isinstance(m, dict):
            rows.append(f"<tr><td>{_e(t.get('target'))}</td>" + "".join(f"<td class=n>{_num(m.get(k), 6)}</td>" for k in names) + "</tr>")
    return "<table class=small><tr><th>target</th>" + "".join(f"<th>{_e(k)}</th>" for k in names) + "</tr>" + "".join(rows) + "</table>"


# ---------------------------------------------------------------- layers kept in float


def fallback_section(targets: list[dict]) -> str:
    """Per target whose quantize step kept layers in float to meet its gates: the goal, whether it was
    met, the size and latency cost, whether the sensitivity scan ran (the quantize step runs it only
    when the all-quantized model fails, or reuses an earlier one), each kept layer with the gate
    metrics when only it is quantized, and the search's trials (how many layers kept, what that measured)."""
    parts = []
    for t in targets:
        if isinstance(t.get("fallback"), dict):
            parts.append(f"<h3>{_e(t.get('target'))}</h3>" + fallback_summary(t["fallback"]) + kept_table(t["fallback"]) + trials_table(t["fallback"]))
    return "".join(parts)


def fallback_summary(fallback: dict) -> str:
    goal = ", ".join(f"{k} {'≤' if k.startswith('max') else '≥'} {_num(v, 6)}" for k, v in sorted((fallback.get("goal") or {}).items())) or "–"
    passed = fallback.get("passed")
    verdict = {True: '<span class="ok">met</span>', False: '<span class="bad">not met</span>'}.get(passed, '<span class="muted">not said</span>')
    latency = fallback.get("latency_ms") or {}
    costs = [f"size {_bytes_delta(fallback.get('bytes_cost'))}",
             f"latency {_ms(_float(latency.get('all_quantized')))} all quantized → {_ms(_float(latency.get('with_fallback')))} with these layers in {fallback.get('kept_as') or 'float'}"
             + (" (measured while other steps ran)" if latency.get("alone") is False else ""),
             *scan_summary(fallback.get("scan")), f"search {_num(fallback.get('search_seconds'), 3)} s"]
    return f"<p class=small>goal {_e(goal)}: {verdict} · " + " · ".join(_e(c) for c in costs) + "</p>"


def scan_summary(scan: Any) -> list[str]:
    """The per-layer scan in a few words (the quantize step's facts["fallback"]["scan"]), or nothing
    for a report that has no such facts."""
    if not isinstance(scan, dict):
        return []
    if scan.get("ran") is False:
        return [f"no scan: {scan.get('why') or 'not needed'}"]
    what = f"scan of {_num(scan.get('layers'), 6)} layers on {_num(scan.get('samples'), 6)} samples"
    return [f"{what} reused from an earlier build" if scan.get("reused") else f"{what} {_num(scan.get('seconds'), 3)} s"]


def kept_table(fallback: dict) -> str:
    kept = [k for k in fallback.get("kept") or [] if isinstance(k, dict)]
    if not kept:
        return ("<p class=bad>no number of layers kept in float met the goal (see the trials)</p>" if fallback.get("passed") is False
                else "<p class=muted>no layer kept in float: the goal was met fully quantized</p>")
    rows = "".join(
        f"<tr><td><code>{_e(k.get('weight'))}</code></td><td class=small><code>{_e(k.get('node'))}</code></td>"
        f"<td class=n>{_num((k.get('alone') or {}).get('min_cosine'), 6)}</td><td class=n>{_num((k.get('alone') or {}).get('mean_cosine'), 6)}</td></tr>"
        for k in kept)
    return ("<table class=small><tr><th>layer kept in float</th><th>node</th><th>min cosine, it alone quantized</th>"
            "<th>mean cosine, it alone quantized</th></tr>" + rows + "</table>")


def trials_table(fallback: dict) -> str:
    trials = [r for r in fallback.get("trials") or [] if isinstance(r, dict)]
    if not trials:
        return ""
    rows = "".join(f"<tr><td class=n>{_num(r.get('kept'), 6)}</td><td class=n>{_num(r.get('min_cosine'), 6)}</td>"
                   f"<td class=n>{_num(r.get('mean_cosine'), 6)}</td><td>{_passed_html(r.get('passed'))}{_stopped(r)}</td></tr>" for r in trials)
    return "<table class=small><tr><th>trial: layers kept</th><th>min cosine</th><th>mean cosine</th><th>gate</th></tr>" + rows + "</table>"


def _stopped(trial: dict) -> str:
    if not trial.get("stopped_early"):
        return ""
    return " <span class=muted>(stopped at the first batch failing a min / max gate: values over the batches run)</span>"


def _float(value: Any) -> float | None:
    return float(value) if _finite(value) else None


def _bytes_delta(value: Any) -> str:
    if not _finite(value):
        return "–"
    return ("+" if value >= 0 else "−") + _bytes(abs(value))


# ---------------------------------------------------------------- calibration


def calibration_section(root: Path, report: dict) -> str:
    steps = report.get("steps") or []
    calibrations = [s for s in steps if s.get("rule") in CALIBRATE_RULES]
    if not calibrations:
        return "<p class=muted>no calibrate step (no static int8 target)</p>"
    chosen = chosen_ranges(steps)
    parts = []
    for step in calibrations:
        path = next((o["path"] for o in step.get("outputs") or [] if str(o.get("path", "")).endswith("calibration.json")), None)
        parts.append(f"<h3>{_e(step.get('step'))}</h3>")
        if path is None or not (root / path).is_file():
            parts.append("<p class=muted>calibration.json not built</p>")
            continue
        try:
            parts.append(calibration_plots(_slug(str(step.get("step"))), (root / path).read_text(), chosen))
        except (ValueError, KeyError, TypeError) as err:  # a torn or foreign file: the page still gets written
            parts.append(f"<p class=bad>{_e(path)}: cannot be read as a kiln calibration ({_e(type(err).__name__)}: {_e(err)})</p>")
    return "".join(parts)


def chosen_ranges(steps: list[dict]) -> dict[str, list[tuple[str, str, float, float]]]:
    """tensor -> (target, method, low, high) of each quantize step that ran on a calibration."""
    found: dict[str, list[tuple[str, str, float, float]]] = {}
    for step in steps:
        info = step.get("info") or {}
        if step.get("rule") in QUANTIZE_RULES and isinstance(info.get("ranges"), dict):
            target = ",".join(step.get("targets") or [str(step.get("step"))])
            for tensor, (lo, hi) in sorted(info["ranges"].items()):
                found.setdefault(tensor, []).append((target, str(info.get("method", "?")), float(lo), float(hi)))
    return found


def method_ranges(calibration: Any, tensor: str) -> dict[str, tuple[float, float]]:
    """Each method's (low, high) for one tensor with the quantize rules' defaults, by their own code."""
    from kiln.build_rules.quantize_static import QuantizeStaticParams, activation_ranges

    return {method: activation_ranges(calibration, [tensor], QuantizeStaticParams(method=method))[tensor] for method in METHODS}


def calibration_plots(step_id: str, text: str, chosen: dict) -> str:
    from kiln.native.calibration import Calibration

    calibration = Calibration.from_json(text)
    names = sorted(calibration.observers)
    shown = names[:MAX_HISTOGRAMS]
    parts = [f"<p class=small>{len(names)} tensors observed; |x| histograms (log counts) with the clipping threshold "
             f"of each method at the quantize rules' defaults"
             + (", and the range each static target used (dashed)" if chosen else "")
             + (f"; the first {len(shown)} by name are drawn" if len(shown) < len(names) else "") + ".</p><div class=grid>"]
    for i, name in enumerate(shown):
        parts.append(histogram_plot(f"plot-calibration-{step_id}-{i}", name, calibration[name], method_ranges(calibration, name), chosen.get(name, [])))
    parts.append("</div>")
    return "".join(parts)


def histogram_plot(plot_id: str, name: str, observer: Any, ranges: dict[str, tuple[float, float]], chosen: list[tuple]) -> str:
    w, h, left, top, bottom = 340, 200, 10, 34, 56
    counts = [int(c) for c in observer.bins]
    group = max(1, len(counts) // HISTOGRAM_BARS)
    bars = [sum(counts[i:i + group]) for i in range(0, len(counts), group)]
    span = observer.range or 1.0
    tallest = math.log1p(max(bars)) if bars and max(bars) else 1.0
    plot_w, plot_h = w - 2 * left, h - top - bottom
    bar_w = plot_w / len(bars) if bars else plot_w

    def px(v: float) -> float:
        return left + min(max(v / span, 0.0), 1.0) * plot_w

    body = [_text(left, 13, _clip_left(name, 52)),
            _text(left, 27, f"min {_num(observer.min, 4)}  max {_num(observer.max, 4)}  |x| ≤ {_num(observer.absmax, 4)}", cls="muted")]
    for i, count in enumerate(bars):
        if count:
            bh = math.log1p(count) / tallest * plot_h
            body.append(f'<rect x="{_c(left + i * bar_w)}" y="{_c(top + plot_h - bh)}" width="{_c(max(bar_w - 0.5, 0.5))}" height="{_c(bh)}" fill="#4c78a8"/>')
    body.append(_axes(left, top, w - left, top + plot_h))
    body.append(_text(left, top + plot_h + 12, "0", cls="muted"))
    body.append(_text(w - left, top + plot_h + 12, _num(span, 3), anchor="end", cls="muted"))
    legend_y = top + plot_h + 26
    for j, method in enumerate(METHODS):
        lo, hi = ranges[method]
        t = max(-lo, hi)
        color = METHOD_COLORS[method]
        body.append(f'<line x1="{_c(px(t))}" y1="{top}" x2="{_c(px(t))}" y2="{top + plot_h}" stroke="{color}" stroke-width="1.5">'
                    f"<title>{method}: [{_num(lo, 4)}, {_num(hi, 4)}]</title></line>")
        body.append(_text(left + j * 110, legend_y, f"{method} {_num(t, 3)}", fill=color))
    for k, (target, method, lo, hi) in enumerate(chosen):
        t = max(-lo, hi)
        body.append(f'<line x1="{_c(px(t))}" y1="{top}" x2="{_c(px(t))}" y2="{top + plot_h}" stroke="#000" stroke-dasharray="3 2">'
                    f"<title>{_e(target)} ({_e(method)}): [{_num(lo, 4)}, {_num(hi, 4)}]</title></line>")
        if k < 1:
            body.append(_text(left, legend_y + 14, _clip(f"used: {target} ({method}) [{_num(lo, 3)}, {_num(hi, 3)}]", 56)))
    return _svg(plot_id, w, h, "".join(body), f"calibration histogram of {name}")


# ---------------------------------------------------------------- timeline


def timeline_section(steps: list[dict], warnings: list) -> str:
    """Each step's start and duration and, where recorded, CPU time, peak RSS and its memory
    reservation. This build's runs on one clock (started_at); after a build where nothing ran, the
    steps' last runs (from different builds: laid end to end in plan order, as are runs whose start
    was not recorded)."""
    if not steps:
        return "<p class=muted>no steps</p>"
    this_build = any(s.get("status") in ("ran", "failed") for s in steps)
    prefix = "" if this_build else LAST_RUN
    walls = [_number(s, prefix + "seconds") or 0.0 for s in steps]
    cpus = [_number(s, prefix + "cpu_seconds") for s in steps]
    rss = [_number(s, prefix + "peak_rss_mib") for s in steps]
    reserved = [_number(s, prefix + "reserved_mib") for s in steps]
    started = [_number(s, "started_at") if s.get("status") in ("ran", "failed") else None for s in steps]
    timed = this_build and any(v is not None for v in started)
    if timed:
        origin = min(v for v in started if v is not None)
        starts = [None if v is None else v - origin for v in started]
    else:
        starts, clock = [], 0.0
        for wall in walls:
            starts.append(clock)
            clock += wall
    has_rss = any(v is not None for v in rss)
    end = max((s + d for s, d in zip(starts, walls, strict=True) if s is not None), default=0.0) or 1.0
    label_w, chart_w, rss_w, row_h, top = 300, 480, 190 if has_rss else 0, 16, 24
    w, h = label_w + chart_w + rss_w + 80, top + row_h * len(steps) + 28
    heaviest = max([v for v in rss + reserved if v is not None], default=0) or 1
    caption = ("seconds since the first step started" if timed else
               "seconds, this build's runs laid end to end in plan order (start times not recorded)" if this_build else
               "seconds of each step's last run (nothing ran in this build), laid end to end in plan order")
    body = [_text(label_w, 14, caption, cls="muted")]
    rx = label_w + chart_w + 70
    if has_rss:
        body.append(_text(rx, 14, "peak RSS (| reserved)", cls="muted"))
    for i, step in enumerate(steps):
        y = top + i * row_h
        status = str(step.get("status", ""))
        body.append(_text(label_w - 6, y + 12, _clip(str(step.get("step", "")), 46), anchor="end"))
        if starts[i] is None:  # up to date in a timed build: it did not run on this clock
            body.append(_text(label_w + 4, y + 12, status, cls="muted"))
        else:
            x, width = label_w + starts[i] / end * chart_w, walls[i] / end * chart_w
            color = {"ran": "#4c78a8", "failed": "#cf222e"}.get(status, "#bbb")
            tip = f"{step.get('step')}: {status}, {_num(walls[i], 3)} s" + (f", CPU {_num(cpus[i], 3)} s" if cpus[i] is not None else "")
            body.append(f'<rect x="{_c(x)}" y="{y + 2}" width="{_c(max(width, 1.5))}" height="{row_h - 4}" fill="{color}"><title>{_e(tip)}</title></rect>')
            body.append(_text(x + max(width, 1.5) + 4, y + 12, f"{_num(walls[i], 3)} s" if walls[i] else status, cls="muted"))
        if rss[i] is not None:
            color = "#e45756" if step.get("warnings") else "#9467bd"
            body.append(f'<rect x="{rx}" y="{y + 2}" width="{_c(max(rss[i] / heaviest * (rss_w - 80), 1))}" height="{row_h - 4}" fill="{color}"/>')
            body.append(_text(rx + rss_w - 76, y + 12, _bytes(rss[i] * 2**20), cls="muted"))
        if reserved[i] is not None and has_rss:
            mx = rx + reserved[i] / heaviest * (rss_w - 80)
            body.append(f'<line x1="{_c(mx)}" y1="{y + 1}" x2="{_c(mx)}" y2="{y + row_h - 1}" stroke="#000"><title>reserved {_num(reserved[i], 6)} MiB</title></line>')
    body.append(_axes(label_w, top - 2, label_w + chart_w, top + row_h * len(steps)))
    body.append(_text(label_w + chart_w, h - 6, f"{_num(end, 3)} s", anchor="end", cls="muted"))
    notes = "".join(f"<li>{_e(warning)}</li>" for warning in warnings)
    return _svg("plot-timeline", w, h, "".join(body), "step timeline") + (f"<ul class=bad>{notes}</ul>" if notes else "")


def _number(step: dict, key: str) -> float | None:
    value = step.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------- changes


def changes_section(report: dict, previous: dict | None, targets: list[dict]) -> str:
    if previous is None:
        return "<p class=muted>no previous build to compare with</p>"
    before = {a.get("target"): a for a in previous.get("artifacts") or []}
    now = {t.get("target"): t for t in targets}
    old_keys, new_keys = _publish_keys(previous), _publish_keys(report)
    rows = []
    for name in sorted(set(before) | set(now), key=str):
        a, b = before.get(name), now.get(name)
        if a is None or b is None:
            rows.append(f"<tr><td>{_e(name)}</td><td colspan=4>{'new target' if a is None else 'removed'}</td></tr>")
            continue
        changes = target_changes(a, b, old_keys.get(name), new_keys.get(name))
        if changes:
            rows.append(f"<tr><td>{_e(name)}</td><td>" + "<br>".join(_e(c) for c in changes) + "</td></tr>")
    header = f"<p class=small>previous build: {_e(previous.get('generated_at'))}</p>"
    if not rows:
        return header + "<p>no target changed (bytes, digest, metrics, latency)</p>"
    return header + "<table><tr><th>target</th><th>what changed</th></tr>" + "".join(rows) + "</table>"


def target_changes(before: dict, after: dict, old_key: str | None, new_key: str | None) -> list[str]:
    """What changed for one target, one line each: bytes, digest (sha256 when both reports carry it,
    else the publishing step's key), status, gate, every metric, median latency."""
    lines = []
    if before.get("bytes") != after.get("bytes"):
        lines.append(f"bytes {_bytes(before.get('bytes'))} → {_bytes(after.get('bytes'))} ({_delta(before.get('bytes'), after.get('bytes'))})")
    if before.get("sha256") and after.get("sha256") and before["sha256"] != after["sha256"]:
        lines.append(f"sha256 {before['sha256'][:12]} → {after['sha256'][:12]}")
    elif old_key and new_key and old_key != new_key:
        lines.append(f"rebuilt from different inputs (step key {old_key[:12]} → {new_key[:12]})")
    for field in ("status", "passed"):
        if before.get(field) != after.get(field):
            lines.append(f"{field} {before.get(field)} → {after.get(field)}")
    old_metrics, new_metrics = before.get("metrics") or {}, after.get("metrics") or {}
    for output in sorted(set(old_metrics) | set(new_metrics)):
        old, new = old_metrics.get(output) or {}, new_metrics.get(output) or {}
        for metric in sorted(set(old) | set(new)):
            if old.get(metric) != new.get(metric):
                lines.append(f"{output} {metric} {_num(old.get(metric), 6)} → {_num(new.get(metric), 6)} ({_delta(old.get(metric), new.get(metric))})")
    old_ms, new_ms = median_ms(before.get("latency")), median_ms(after.get("latency"))
    if old_ms != new_ms:
        lines.append(f"latency {_ms(old_ms)} → {_ms(new_ms)} ({_delta(old_ms, new_ms)})")
    return lines


def _publish_keys(report: dict) -> dict[str, str]:
    """target -> key of the step that published it (the validate step: its key covers the artifact)."""
    keys = {}
    for step in report.get("steps") or []:
        if step.get("rule") == "validate" and step.get("key"):
            for target in step.get("targets") or []:
                keys[target] = step["key"]
    return keys


def tools_table(tools: dict) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in sorted(tools.items()))
    return f"<table class=small><tr><th>tool</th><th>version</th></tr>{rows}</table>"


# ---------------------------------------------------------------- html and svg pieces


def _document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _header(report: dict) -> str:
    counts = report.get("counts") or {}
    summary = ", ".join(f"{_e(v)} {_e(k)}" for k, v in counts.items())
    return (f"<h1>{_e(report.get('model'))} {_status_html(report.get('ok'))}</h1>"
            f"<p class=muted>generated {_e(report.get('generated_at'))} · {_num(report.get('seconds'), 3)} s · steps: {summary}</p>")


def _section(title: str, content: str) -> str:
    return f"<h2>{_e(title)}</h2>\n{content}\n"


def _svg(plot_id: str, w: int, h: int, body: str, label: str) -> str:
    return (f'<svg class="plot" id="{_attr(plot_id)}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{_attr(label)}">{body}</svg>')


def _text(x: float, y: float, text: str, anchor: str = "start", cls: str = "", fill: str = "", rotate: bool = False) -> str:
    extra = (f' class="{cls}"' if cls else "") + (f' style="fill:{fill}"' if fill else "")
    if rotate:
        extra += f' transform="rotate(-90 {_c(x)} {_c(y)})"'
        anchor = "end"
    return f'<text x="{_c(x)}" y="{_c(y)}" text-anchor="{anchor}"{extra}>{_e(text)}</text>'


def _axes(x0: float, y0: float, x1: float, y1: float) -> str:
    return f'<path d="M{_c(x0)} {_c(y0)}V{_c(y1)}H{_c(x1)}" fill="none" stroke="#888"/>'


def _tick_x(x: float, y: float, label: str) -> str:
    return f'<line x1="{_c(x)}" y1="{_c(y)}" x2="{_c(x)}" y2="{_c(y + 4)}" stroke="#888"/>' + _text(x, y + 16, label, anchor="middle", cls="muted")


def _tick_y(x: float, y: float, label: str) -> str:
    return f'<line x1="{_c(x - 4)}" y1="{_c(y)}" x2="{_c(x)}" y2="{_c(y)}" stroke="#888"/>' + _text(x - 6, y + 4, label, anchor="end", cls="muted")


def _decades(lo: float, hi: float) -> list[int]:
    """Whole powers of ten within [lo, hi] (log10 values), at most 8 of them evenly thinned."""
    found = list(range(math.ceil(lo), math.floor(hi) + 1))
    step = max(1, math.ceil(len(found) / 8))
    return found[::step]


def _padded(lo: float, hi: float) -> tuple[float, float]:
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))


def _palette(i: int) -> str:
    return ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d", "#ff9da6", "#79706e")[i % 10]


def _c(v: float) -> str:
    """A coordinate rounded to 0.1 px: small files and the same bytes on every machine."""
    text = f"{v:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _attr(value: str) -> str:
    return html.escape(value, quote=True)


def _slug(name: str) -> str:
    """An id-safe form of a user's name (ids must stay unique and valid whatever the manifest says)."""
    return "".join(c if c.isalnum() or c in "-_" else f"_{ord(c):x}" for c in name)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _clip_left(text: str, n: int) -> str:
    """The end of a long name (tensor names differ at their end: the layer, not the module path)."""
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _num(value: Any, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.{digits}g}"


def _one_minus(value: Any) -> float | None:
    return 1.0 - value if isinstance(value, (int, float)) else None


def _delta(old: Any, new: Any) -> str:
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
        return "n/a"
    rel = f", {100 * (new - old) / abs(old):+.1f}%" if old else ""
    return f"{new - old:+.4g}{rel}"


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _ms(value: float | None) -> str:
    return f"{value:.3g} ms" if value is not None else "n/a"


def _latency_text(latency: Any) -> str:
    if not isinstance(latency, dict):
        return "–"
    value = median_ms(latency)
    return _e(_ms(value)) if value is not None else f'<span class=muted title="{_attr(str(latency.get("skipped", "")))}">not measured</span>'


def _latency_cell(artifact: dict) -> str:
    """The median latency and, for a quantized target, its ratio to the fp32 artifact of its format
    (red when slower: a quantization that costs speed must not read as a win)."""
    text = _latency_text(artifact.get("latency"))
    versus = artifact.get("latency_vs_fp32")
    if not isinstance(versus, dict) or not _finite(versus.get("ratio")):
        return text
    ratio = versus["ratio"]
    tip = f"{_ms(_float(versus.get('ms')))} against {versus.get('target')}'s {_ms(_float(versus.get('fp32_ms')))}, same input shape"
    cls = "bad" if ratio > 1.0 else "muted"
    return f'{text} <span class={cls} title="{_attr(tip)}">({_e(ratio_text(ratio))}× {_e(versus.get("target"))})</span>'


def _status_html(ok: Any) -> str:
    return {True: '<span class="ok">✔ ok</span>', False: '<span class="bad">✘ failed</span>'}.get(ok, "")


def _gate_html(artifact: dict) -> str:
    """The gate cell: a NaN or infinite metric the gates let through (one not gated) says so
    rather than "passed"."""
    if has_nonfinite(artifact.get("metrics")) and artifact.get("passed") is not False:
        return '<span class="bad">✘ nonfinite metric</span>'
    return _passed_html(artifact.get("passed"))


def _passed_html(passed: Any) -> str:
    return {True: '<span class="ok">✔ passed</span>', False: '<span class="bad">✘ failed</span>'}.get(passed, '<span class="muted">–</span>')
