"""`kiln diff`: what changed between two builds of a model, per target, from their report.json
(size, validation metrics, latency, gate) and kiln.lock.json (bytes, digest); and gates on that
change (`--fail-on min_cosine=0.001`), so CI can fail a commit that made a target less accurate
even when the target still passes its own thresholds.

A side of the comparison is a report.json, a kiln.lock.json, a build folder (build/<model>/: both
files in it), or any of those as committed at a git ref (`git show REF:path`). The previous build of
a folder is its report.previous.json / kiln.lock.previous.json, where the report writer keeps them.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import UsageError

REPORT, LOCK = "report.json", "kiln.lock.json"
PREVIOUS = {REPORT: "report.previous.json", LOCK: "kiln.lock.previous.json"}
# Which way is better for each metric a gate can name. The accuracy metrics are per output
# (kiln.runtime.metrics); bytes and latency_ms are per target.
HIGHER_IS_BETTER = ("min_cosine", "mean_cosine")
LOWER_IS_BETTER = ("max_abs_diff", "max_rel_diff", "nonfinite", "mismatched", "bytes", "latency_ms")
GATE_METRICS = (*HIGHER_IS_BETTER, *LOWER_IS_BETTER)


@dataclass
class Side:
    """One build as the files recorded it: per target, what the report and the lockfile say."""

    label: str  # where it came from, for the output
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str | None = None

    def add(self, data: dict[str, Any], label: str) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("artifacts"), list):
            raise UsageError(label, "not a kiln report.json or kiln.lock.json (no 'artifacts' list)")
        self.model = self.model or data.get("model")
        for artifact in data["artifacts"]:
            if not isinstance(artifact, dict) or not isinstance(artifact.get("target"), str):
                raise UsageError(label, f"an entry of 'artifacts' has no target name: {str(artifact)[:80]}")
            entry = self.targets.setdefault(artifact["target"], {})
            if "lock_version" in data:
                entry["sha256"] = artifact.get("sha256")
                entry.setdefault("bytes", artifact.get("bytes"))
            else:
                entry["bytes"] = artifact.get("bytes", entry.get("bytes"))
                entry |= {key: artifact.get(key) for key in ("metrics", "passed", "status")}
                latency = (artifact.get("latency") or {}).get("median_ms")
                if latency is not None:
                    entry["latency_ms"] = latency


@dataclass(frozen=True)
class Gate:
    metric: str
    delta: float
    relative: bool  # "5%": of the earlier value

    def allowed(self, before: float) -> float:
        return abs(before) * self.delta / 100 if self.relative else self.delta


def parse_gate(text: str) -> Gate:
    """METRIC=DELTA (absolute) or METRIC=DELTA% (of the earlier value), DELTA >= 0."""
    metric, sep, value = text.partition("=")
    if not sep or metric not in GATE_METRICS:
        raise UsageError("--fail-on", f"{text!r}: expected METRIC=DELTA with METRIC one of {list(GATE_METRICS)}")
    relative = value.endswith("%")
    try:
        delta = float(value.removesuffix("%"))
    except ValueError:
        delta = -1.0
    if not delta >= 0 or math.isinf(delta):  # also refuses nan
        raise UsageError("--fail-on", f"{text!r}: DELTA {value!r} is not a number >= 0 (e.g. 0.001, or 5% of the earlier value)")
    return Gate(metric, delta, relative)


# ---- reading a side --------------------------------------------------------------------------

def read_side(path: Path, previous: bool = False) -> Side:
    """A report/lockfile path, or a build folder (its report and lockfile; with previous, the copies
    of the build before)."""
    side = Side(str(path))
    if path.is_dir():
        names = [PREVIOUS[n] if previous else n for n in (REPORT, LOCK)]
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            what = "copy of a previous build (a build keeps one when it changes the lockfile; or give two paths or --against GIT_REF)" if previous else f"{REPORT} or {LOCK}"
            raise UsageError(str(path), f"holds no {what}")
        for file in found:
            side.add(_load(file.read_text(encoding="utf-8"), str(file)), str(file))
        side.label = ", ".join(str(f) for f in found)
        return side
    if previous:
        file = path.with_name(PREVIOUS.get(path.name, path.name))
        if file == path or not file.is_file():
            raise UsageError(str(path), "no copy of the previous build beside it (give two paths or --against GIT_REF)")
        path, side.label = file, str(file)
    if not path.is_file():
        raise UsageError(str(path), "no such file or build folder")
    side.add(_load(path.read_text(encoding="utf-8"), str(path)), str(path))
    return side


def read_side_at(ref: str, path: Path) -> Side:
    """The same files as committed at git `ref` (a build folder: whichever of the two it holds)."""
    top = _git(path.parent if path.is_file() or not path.exists() else path, "rev-parse", "--show-toplevel").strip()
    rel = Path(path).resolve().relative_to(Path(top).resolve())
    files = [rel / REPORT, rel / LOCK] if path.is_dir() else [rel]
    side = Side(f"{ref}:{rel}")
    for file in files:
        try:
            text = _git(Path(top), "show", f"{ref}:{file.as_posix()}")
        except UsageError:
            if not path.is_dir():
                raise
            continue  # a build folder that committed only one of the two
        side.add(_load(text, f"{ref}:{file}"), f"{ref}:{file}")
    if not side.targets:
        raise UsageError(f"{ref}:{rel}", f"git holds no {REPORT} or {LOCK} there at {ref}")
    return side


def _git(cwd: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise UsageError("--against", f"cannot run git: {err.strerror}") from None
    if proc.returncode != 0:
        raise UsageError("--against", f"git {' '.join(args)}: {' '.join(proc.stderr.split())[:200]}")
    return proc.stdout


def _load(text: str, label: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except ValueError as err:
        raise UsageError(label, f"not JSON ({err})") from None


# ---- comparing ---------------------------------------------------------------------------------

def measures(entry: dict[str, Any]) -> dict[str, float]:
    """A target's comparable numbers, by the name a gate uses: 'output.metric' for accuracy, plus
    bytes and latency_ms."""
    found: dict[str, float] = {}
    for output, values in sorted((entry.get("metrics") or {}).items()):
        for metric, value in sorted(values.items()):
            if metric in GATE_METRICS and isinstance(value, (int, float)):
                found[f"{output}.{metric}"] = float(value)
    for key in ("bytes", "latency_ms"):
        if isinstance(entry.get(key), (int, float)):
            found[key] = float(entry[key])
    return found


def worse_by(metric: str, before: float, after: float) -> float:
    """How much worse `after` is than `before` (<= 0: not worse). A value that became NaN is
    infinitely worse: a NaN compares false with every threshold and must not pass a gate."""
    if math.isnan(after):
        return 0.0 if math.isnan(before) else math.inf
    if math.isnan(before):
        return -math.inf
    return before - after if metric in HIGHER_IS_BETTER else after - before


def compare(before: Side, after: Side, gates: list[Gate]) -> tuple[list[str], list[str]]:
    """(lines to print, gate failures). A target that a gate covers and that lost the measurement
    (removed, or no longer validated) fails the gate: a missing number must not read as no regression."""
    lines, failures = [], []
    for target in sorted(before.targets.keys() | after.targets.keys()):
        old, new = before.targets.get(target), after.targets.get(target)
        if old is None:
            lines.append(f"  {target}: added")
            continue
        if new is None:
            lines.append(f"  {target}: removed")
            failures += [f"{target}: {gate.metric}: target removed" for gate in gates if _covers(gate, measures(old))]
            continue
        lines.append(f"  {target}: {_summary(old, new)}")
        old_m, new_m = measures(old), measures(new)
        if old_m == new_m:
            lines[-1] += "; size, metrics and latency unchanged"
        for name in sorted(old_m.keys() | new_m.keys()):
            metric = name.rsplit(".", 1)[-1]
            a, b = old_m.get(name), new_m.get(name)
            if a is not None and b is not None and (a == b or (math.isnan(a) and math.isnan(b))):
                continue
            lines.append(f"    {name}: {_num(a)} -> {_num(b)}{_change(a, b)}")
            for gate in (g for g in gates if g.metric == metric and a is not None):
                if b is None:
                    failures.append(f"{target}: {name}: {_num(a)} before, not measured now")
                elif worse_by(metric, a, b) > gate.allowed(a):
                    failures.append(f"{target}: {name}: {_num(a)} -> {_num(b)}, worse by more than {gate.delta:g}{'%' if gate.relative else ''}")
    return lines, failures


def _covers(gate: Gate, values: dict[str, float]) -> bool:
    return any(name.rsplit(".", 1)[-1] == gate.metric for name in values)


def _summary(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    if old.get("sha256") and new.get("sha256"):
        parts.append("same digest" if old["sha256"] == new["sha256"] else f"digest {old['sha256'][:12]} -> {new['sha256'][:12]}")
    else:  # a report alone records no digest: say the bytes were not compared, rather than nothing
        parts.append("digest not compared (no lockfile on " + ("both sides)" if not (old.get("sha256") or new.get("sha256")) else "one side)"))
    if old.get("passed") != new.get("passed") and "passed" in new:
        parts.append(f"gate {_gate(old.get('passed'))} -> {_gate(new.get('passed'))}")
    if old.get("status") == new.get("status") == "failed":
        parts.append("failed in both")
    return ", ".join(parts)


def _gate(passed: Any) -> str:
    return {True: "passed", False: "FAILED", None: "none"}.get(passed, str(passed))


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{int(value)}" if value.is_integer() and abs(value) >= 1 else f"{value:.6g}"


def _change(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return ""
    pct = f", {100 * (b - a) / abs(a):+.1f}%" if a else ""
    return f" ({b - a:+.3g}{pct})"


# ---- what the command line names -----------------------------------------------------------------

def sides(args: list[str], against: str | None, root: Path) -> list[tuple[Side, Side]]:
    """(before, after) pairs for `kiln diff [A] [B] [--against REF]`: two paths compare A with B; one
    path (or none: every build/<model>/ folder) compares it with the same files at REF, or without
    --against with the previous build's copies beside it."""
    if len(args) > 2:
        raise UsageError("kiln diff", f"at most two builds to compare, got {len(args)}")
    paths = [_locate(arg, root) for arg in args]
    if len(paths) == 2:
        if against:
            raise UsageError("--against", "give either two builds or one build and --against GIT_REF, not both")
        return [(read_side(paths[0]), read_side(paths[1]))]
    if not paths:
        build = root / "build"
        paths = sorted(p for p in build.iterdir() if p.is_dir() and ((p / REPORT).is_file() or (p / LOCK).is_file())) if build.is_dir() else []
        if not paths:
            raise UsageError(str(build), f"no build folder with a {REPORT} or {LOCK}: build first, or give the files to compare")
    return [(read_side_at(against, p) if against else read_side(p, previous=True), read_side(p)) for p in paths]


def _locate(arg: str, root: Path) -> Path:
    """A path as typed, else a model name: build/<name>/."""
    path = Path(arg)
    if path.exists():
        return path.resolve()
    if len(path.parts) == 1 and (root / "build" / arg).is_dir():
        return (root / "build" / arg).resolve()
    raise UsageError(arg, f"no such report, lockfile or build folder (nor {root / 'build' / arg})")


def diff_text(pairs: list[tuple[Side, Side]], gates: list[Gate]) -> tuple[list[str], list[str]]:
    """All the lines `kiln diff` prints, and every gate failure."""
    lines, failures = [], []
    for before, after in pairs:
        model = after.model or before.model or "?"
        lines.append(f"{model}: {before.label} -> {after.label}")
        body, failed = compare(before, after, gates)
        lines += body
        failures += [f"{model}/{f}" for f in failed]
    return lines, failures
