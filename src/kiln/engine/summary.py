"""The table printed at the end of every build (a no-op build too): one row per target of a
manifest's report (kiln.state.report), then where its HTML report is. Made from the report dict
alone, so the no-op fast path (which plans nothing) prints the same table as a full build.

Plain text (aligned columns, no box drawing) where the output is not a terminal, so CI logs keep it
readable; a rich table in a terminal. A quantized target's latency cell has its ratio to the fp32
artifact of its format ("8.06 ms (0.36x)"), and each target whose quantize step kept layers in float
gets a line under the table saying which, what that bought and what it cost."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, TextIO

from kiln.state.report import ratio_text, slower_warning

COLUMNS = ("target", "format", "precision", "size", "latency", "worst", "mean", "gate", "status", "why")
# A row's extra cells (not columns), each a line under the table: a target that kept layers in float,
# and one slower than the fp32 artifact of its format (its report warning).
FALLBACK, SLOWER = "fallback", "slower"
MAX_KEPT_NAMES = 3  # kept layers named in that line; the report lists them all


def html_report_path(root: Path, model: str) -> Path:
    """build/<model>/report.html (written by the HTML report writer; the table only names it)."""
    return root / "build" / model / "report.html"


def is_terminal(stream) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def print_table(stream: TextIO, model: str, rows: list[dict[str, str]]) -> None:
    """The table on `stream`: rich in a terminal, plain text elsewhere (the no-op fast path, which
    has no display)."""
    if not rows:
        return
    if is_terminal(stream) and os.environ.get("TERM") != "dumb":
        from rich.console import Console

        Console(file=stream, force_terminal=True).print(rich_table(model, rows))
    else:
        stream.write(plain_table(rows, model) + "\n")
    stream.flush()


def html_line(root: Path, model: str) -> str:
    """Under the summary line: where the HTML report is (not a `kiln: ` line, so tools that read
    those, one per manifest, keep reading one)."""
    return f"report: {html_report_path(root, model).relative_to(root)}"


def target_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """One row per target of the report, every cell a string (COLUMNS; FALLBACK for a target whose
    quantize step kept layers in float, SLOWER for one slower than its fp32 artifact)."""
    rows = []
    for artifact in report.get("artifacts", []):
        target = artifact["target"]
        steps = [s for s in report.get("steps", []) if target in s.get("targets", [])]
        worst, mean = _accuracy(artifact)
        status, why = _status(artifact, steps)
        rows.append({
            "target": target, "format": artifact.get("format") or "-", "precision": artifact.get("precision") or "-",
            "size": _size(artifact.get("bytes")), "latency": _latency(artifact.get("latency"), artifact.get("latency_vs_fp32")),
            "worst": worst, "mean": mean, "gate": "nan" if _nonfinite(artifact) and artifact.get("passed") is not False else _gate(artifact.get("passed"), status), "status": status, "why": why,
        })
        if isinstance(artifact.get("fallback"), dict):
            rows[-1][FALLBACK] = fallback_text(artifact["fallback"])
        slower = slower_warning(artifact, artifact.get("precision"))
        if slower:
            rows[-1][SLOWER] = slower
    for skipped in report.get("skipped", []):
        rows.append(dict.fromkeys(COLUMNS, "-") | {"target": skipped["target"], "status": "skipped", "why": skipped["why"]})
    return rows


def _accuracy(artifact: dict[str, Any]) -> tuple[str, str]:
    """(worst, mean) over the target's outputs: 1 - cosine where the manifest gates on it (short
    scientific form, so fp32's 1e-8 and fp16's 1e-5 differ where "cos 1.000000" hid both); the
    largest absolute difference for exact formats gated on max_abs_diff; mismatched integer labels
    (a class index) added to the worst cell when any differ; "structural" where the artifact was
    checked without running it (Core ML off macOS). Any NaN output shows "nan": min and max skip
    NaN or not depending on order, and a broken output must not hide behind a good one."""
    if artifact.get("validation") and not artifact.get("metrics"):
        return ("structural" if "not validated" not in artifact["validation"] else "not validated"), "-"
    metrics = list((artifact.get("metrics") or {}).values())
    if not metrics:
        return "-", "-"
    mismatched = sum(m.get("mismatched") or 0 for m in metrics)
    labels = f" ({mismatched} labels differ)" if mismatched else ""
    cosines = [m for m in metrics if "min_cosine" in m]
    if cosines:
        worst = _worst([1.0 - m["min_cosine"] for m in cosines])
        means = [1.0 - m["mean_cosine"] for m in cosines if "mean_cosine" in m]
        mean = "-" if len(means) < len(cosines) else "1-cos " + _sci(_mean(means))
        return f"1-cos {_sci(worst)}{labels}", mean
    diffs = [m["max_abs_diff"] for m in metrics if "max_abs_diff" in m]
    if diffs:
        return f"max|d| {_sci(_worst(diffs))}{labels}", "-"
    return (labels.strip(" ()") or "-"), "-"


def _worst(errors: list[float]) -> float:
    """The largest error, NaN if any is NaN (max alone keeps or drops a NaN by its position)."""
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def _mean(errors: list[float]) -> float:
    return math.nan if any(math.isnan(e) for e in errors) else sum(errors) / len(errors)


def _sci(value: float) -> str:
    """8.4e-08; "0" for an exact match; nan and inf as such."""
    if not math.isfinite(value):
        return str(value)
    return "0" if value == 0 else f"{value:.1e}"


def _nonfinite(artifact: dict[str, Any]) -> bool:
    """A NaN or infinite value among the target's metrics (gated or not)."""
    return any(isinstance(v, float) and not math.isfinite(v)
               for m in (artifact.get("metrics") or {}).values() if isinstance(m, dict) for v in m.values())


def _status(artifact: dict[str, Any], steps: list[dict[str, Any]]) -> tuple[str, str]:
    """The target's status (failed > ran > not run > up to date over its steps) and why: the error
    of the step that failed, the reason the first step that ran gives, or "up to date"."""
    for status in ("failed", "ran"):
        hit = next((s for s in steps if s.get("status") == status), None)
        if hit is not None:
            text = hit.get("error") if status == "failed" else hit.get("why")
            return status, f"{hit['step'].rsplit('/', 1)[-1]}: {text or ''}".strip()
    if any(s.get("status") == "not run" for s in steps) or artifact.get("status") == "not run":
        return "not run", next((s.get("why") or "" for s in steps if s.get("status") == "not run"), "")
    return "up to date", "inputs and outputs unchanged"


def _gate(passed: bool | None, status: str) -> str:
    if passed is True:
        return "pass"
    if passed is False:
        return "FAIL"
    return "-" if status in ("not run", "failed") else "none"


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _latency(latency: dict[str, Any] | None, versus: dict[str, Any] | None = None) -> str:
    """"8.06 ms", and its ratio to the fp32 artifact's when the report has one: "8.06 ms (0.36x)"."""
    if not latency or "median_ms" not in latency:
        return "-"
    ratio = (versus or {}).get("ratio")
    compared = f" ({ratio_text(ratio)}x)" if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else ""
    return f"{latency['median_ms']:.2f} ms{compared}"


def fallback_text(fallback: dict[str, Any]) -> str:
    """What a fallback did, for a line under the table: "kept 2 layers in float (a, b): min_cosine
    0.969 -> 0.982, +1.8 MB, latency 7.8 -> 8.1 ms" (the worst-output min cosine of the trial with
    every layer quantized, then of the trial that kept these layers), or "gate not reached with 5
    layers kept in float (...)" and the goal it missed."""
    kept = [k for k in fallback.get("kept") or [] if isinstance(k, dict)]
    names = [str(k.get("node") or k.get("weight") or "?") for k in kept]
    count = len(kept) or (_most_kept(fallback) if fallback.get("passed") is False else 0)  # a search that failed chose no layers: its last try
    layers = f"{count} layer{'' if count == 1 else 's'}" if count else "no layer"
    kept_as = str(fallback.get("kept_as") or "float")
    text = f"gate not reached with {layers} kept in {kept_as}" if fallback.get("passed") is False else f"kept {layers} in {kept_as}"
    if names:
        more = f", ... {len(names) - MAX_KEPT_NAMES} more" if len(names) > MAX_KEPT_NAMES else ""
        text += f" ({', '.join(names[:MAX_KEPT_NAMES])}{more})"
    facts = []
    cosines = _fallback_cosines(fallback, count)
    if cosines:  # a trial stopped at its first failing batch saw part of the data: its true minimum is at most that
        facts.append("min_cosine " + " -> ".join(f"{'<=' if partial else ''}{c:.3f}" for c, partial in cosines))
        goal = (fallback.get("goal") or {}).get("min_cosine")
        if fallback.get("passed") is False and _number(goal):
            facts[-1] += f" (goal {goal:g})"
    if kept and _number(fallback.get("bytes_cost")):
        facts.append(f"{fallback['bytes_cost'] / 1e6:+.1f} MB")
    latency = fallback.get("latency_ms") or {}
    if _number(latency.get("all_quantized")) and _number(latency.get("with_fallback")):
        facts.append(f"latency {latency['all_quantized']:.3g} -> {latency['with_fallback']:.3g} ms"
                     + (" (measured beside other steps)" if latency.get("alone") is False else ""))
    return text + (": " + ", ".join(facts) if facts else "")


def _fallback_cosines(fallback: dict[str, Any], kept: int) -> list[tuple[float, bool]]:
    """(min cosine, whether its trial stopped early) with every layer quantized and with the kept
    layers in float (one entry when these are the same trial: nothing was kept); [] when the trials
    do not say."""
    trials = [t for t in fallback.get("trials") or [] if isinstance(t, dict) and _number(t.get("min_cosine"))]
    before = next((t for t in trials if t.get("kept") == 0), None)
    after = next((t for t in trials if t.get("kept") == kept), trials[-1] if trials else None)
    chosen = [after] if before is None or before is after else [before, after]
    return [(t["min_cosine"], bool(t.get("stopped_early"))) for t in chosen if t is not None]


def _most_kept(fallback: dict[str, Any]) -> int:
    return max((t["kept"] for t in fallback.get("trials") or [] if isinstance(t, dict) and _number(t.get("kept"))), default=0)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plain_table(rows: list[dict[str, str]], model: str | None = None, why_width: int = 60) -> str:
    """Aligned plain-text columns (a CI log): the model's name (two manifests built together give
    two tables), a header, a dashed rule, one line per row."""
    cells = [dict(row, why=_clip(row["why"], why_width)) for row in rows]
    widths = {c: max([len(c), *(len(row[c]) for row in cells)]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip(), "  ".join("-" * widths[c] for c in COLUMNS)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in COLUMNS).rstrip() for row in cells]
    return "\n".join(([f"model {model}:"] if model else []) + lines + notes_under(rows))


def notes_under(rows: list[dict[str, str]]) -> list[str]:
    """Under the table: "<target>: kept 2 layers in float (...)" per target with a fallback, then
    "<target> (int8) runs 1.05x slower than <fp32 target> (...)" per target slower than fp32."""
    return ([f"{row['target']}: {row[FALLBACK]}" for row in rows if row.get(FALLBACK)]
            + [f"warning: {row[SLOWER]}" for row in rows if row.get(SLOWER)])


WHY_MIN = 20  # narrower than this, "why" goes under the table rather than squeezed into a column
# On a narrow terminal these columns leave the table first, in this order, for a line per target
# under it: a column cut short ("cos 1.000…", "p…") reads as a different value, a line does not.
MOVABLE = ("why", "mean", "precision", "latency", "size", "format")


class _TargetTable:
    """The rows as a rich Table sized to the console when printed: no column but "why" is ever
    clipped (a clipped name, gate or number reads as another one); "why" folds into what is left,
    and on a terminal too narrow for all of them the MOVABLE columns go, in order, to a line per
    target under the table."""

    def __init__(self, model: str, rows: list[dict[str, str]]):
        self.model, self.rows = model, rows

    def width(self, column: str) -> int:
        return max([len(column), *(len(row[column]) for row in self.rows)])

    def __rich_console__(self, console, options):
        from rich.text import Text

        columns = list(COLUMNS)
        for column in MOVABLE:
            fixed = sum(self.width(c) + 2 for c in columns if c != "why")
            if fixed + ("why" in columns) * WHY_MIN <= options.max_width:
                break
            columns.remove(column)
        yield self.table(columns)
        moved = [c for c in COLUMNS if c not in columns]
        for row in self.rows if moved else []:
            details = "; ".join(f"{c} {row[c]}" if c != "why" else row[c] for c in moved if row[c] not in ("", "-"))
            if details:
                yield Text(f"{row['target']}: {details}", overflow="fold")
        for line in notes_under(self.rows):
            yield Text(line, overflow="fold")

    def table(self, columns: list[str]):
        from rich import box
        from rich.table import Table

        table = Table(title=f"model {self.model}", title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                      pad_edge=False, collapse_padding=True)
        for column in columns:
            width = self.width(column)
            table.add_column(column, justify="right" if column in ("size", "latency") else "left",
                             **({"overflow": "fold", "ratio": 1, "min_width": min(width, WHY_MIN)} if column == "why"
                                else {"no_wrap": True, "min_width": width}))
        colours = {"pass": "green", "FAIL": "bold red", "nan": "bold red", "failed": "bold red", "ran": "cyan", "up to date": "dim",
                   "not run": "yellow"}
        for row in self.rows:
            table.add_row(*(f"[{colours[row[c]]}]{_escape(row[c])}[/]" if row[c] in colours else _escape(row[c]) for c in columns))
        return table


def rich_table(model: str, rows: list[dict[str, str]]) -> _TargetTable:
    """The same rows for a terminal (gate and status coloured), under a title naming the model."""
    return _TargetTable(model, rows)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
