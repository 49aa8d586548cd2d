"""build/<model>/report.json and the summary line: the only writer of report files, used by the full
build (engine.reporter, at the end of a doit run) and by the no-op fast path (kiln.state.fresh keeps
a template of a manifest's no-op report; publish_unchanged fills it in). Per step: whether it ran or
was up to date and why, its seconds and output sizes, and what it cost; per artifact: its size and
validation metrics; "warnings": steps that came within 10% of their memory reservation or exceeded it.

What a step cost (from its record, kiln.execute.resources.Meter), in its entry: "last_run_started_at"
(Unix time), "last_run_seconds", "last_run_cpu_seconds", "last_run_peak_rss_mib", "last_run_used_mib", "last_run_reserved_mib",
"last_run_exclusive" for every step built before (its most recent run, in this build or an earlier
one); a step that ran in this build (or failed in it) also has them without the prefix ("started_at",
"seconds", "cpu_seconds", ...: this build's), and "warnings" when it came close to its reservation.

Quantized artifacts, in their entry: "latency_vs_fp32" ({"target", "ratio", "fp32_ms", "ms"}: its
median latency against the same format's fp32 artifact measured on the same input shape and threads;
a ratio above 1 adds a report warning), and "fallback" (the facts of the quantize step that kept
layers in float to meet the gates: kept layers, trials, size and latency cost), copied from its chain.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.base.fsio import dumps_by_line, read_json, write_bytes_atomic
from kiln.state.records import MEMORY_HEADROOM, USAGE_KEYS, failure_path, read_record

if TYPE_CHECKING:  # a no-op build never imports the planner (kiln.state.fresh)
    from kiln.plan.steps import Plan

RAN, UP_TO_DATE, FAILED, NOT_RUN = "ran", "up to date", "failed", "not run"
_GENERATED_AT, _SECONDS = "@generated_at@", "@seconds@"  # placeholders in a no-op report template


PREVIOUS_REPORT = "report.previous.json"  # the report of the build before the last one that changed the lockfile


def report_path(root: Path, model: str) -> Path:
    return root / "build" / model / "report.json"


def step_entry(plan: Plan, step, status: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": plan.step_name(step), "rule": step.rule, "targets": plan.targets_of(step), "status": status}
    if status == FAILED:
        failure = read_json(failure_path(plan.root, step)) or {}
        entry |= {"why": failure.get("reason"), "error": failure.get("error", "see doit's output"), "seconds": failure.get("seconds"), "facts": failure.get("facts")}
        if failure.get("log"):
            entry["log"] = failure["log"]  # the traceback and what the rule printed
        return entry | _usage(entry["step"], {k: failure[k] for k in USAGE_KEYS if k in failure}, this_build=True)
    record = read_record(plan.root, step)
    if record is None:
        return entry | {"why": "not built yet"}
    entry["why"] = {RAN: record.reason, UP_TO_DATE: "key unchanged and outputs intact"}.get(
        status, "not checked in this build (doit stopped before it, or it was not selected); built before")
    entry["seconds"] = record.seconds if status == RAN else 0.0
    entry["last_run_seconds"] = record.seconds
    entry["key"] = record.key
    entry |= _usage(entry["step"], record.usage, this_build=status == RAN, last_run=True)
    entry["outputs"] = [{"path": o["path"], "bytes": o["bytes"]} for o in record.outputs.values()]
    if record.info:
        entry["info"] = record.info
    return entry


def _usage(name: str, usage: dict[str, Any], this_build: bool, last_run: bool = False) -> dict[str, Any]:
    """A step entry's cost fields (see the module's docstring) and its memory warning."""
    fields = {f"last_run_{k}": v for k, v in usage.items()} if last_run else {}
    if this_build:
        fields |= usage
        warning = memory_warning(name, usage)
        if warning:
            fields["warnings"] = [warning]
    return fields


def memory_warning(name: str, usage: dict[str, Any]) -> str | None:
    """A warning when the step used more than MEMORY_HEADROOM short of its reservation: the margin
    a learned reservation keeps (kiln.execute.resources.reservation_mib). None for a run that
    reserved nothing (restored from the cache) or shared its process with other steps (its numbers
    include theirs)."""
    used, reserved = usage.get("used_mib"), usage.get("reserved_mib")
    if not usage.get("exclusive") or used is None or reserved is None or used * MEMORY_HEADROOM <= reserved:
        return None
    how = "more than" if used > reserved else "within 10% of"
    return (f"{name}: used {used:g} MiB of memory at its peak, {how} the {reserved} MiB it reserved;"
            f" the next build reserves {math.ceil(used * MEMORY_HEADROOM)} MiB")


def build_report(plan: Plan, statuses: dict[str, str], seconds: float) -> dict[str, Any]:
    steps = [step_entry(plan, s, statuses.get(s.name, NOT_RUN)) for s in plan.steps]
    artifacts = []
    for step, entry in zip(plan.steps, steps, strict=True):
        if step.publishes:
            info = entry.get("info") or entry.get("facts") or {}
            artifact = {"target": step.targets[0], "status": entry["status"], "metrics": info.get("metrics"), "thresholds": info.get("thresholds"), "passed": info.get("passed")}
            if info.get("latency"):
                artifact["latency"] = info["latency"]  # measured when the artifact was last validated
            if info.get("validated") == "structural":  # checked, not run: the reason says why (Core ML off macOS)
                artifact["validation"] = info["not_validated"]
            elif info.get("not_validated"):
                artifact["validation"] = f"not validated: {info['not_validated']}"
            files = [o for o in entry.get("outputs", []) if not o["path"].endswith("validation.json")]
            if files:  # the artifact's path; bytes of all its files (OpenVINO: .xml + .bin)
                artifact |= {"path": files[0]["path"], "bytes": sum(o["bytes"] for o in files)}
            artifacts.append(artifact)
    kinds = {step.targets[0]: (step.params.get("format"), step.params.get("precision")) for step in plan.steps if step.publishes}
    attach_fallback(artifacts, steps)
    latency_warnings = compare_latency(artifacts, steps, kinds)
    return {
        "model": plan.model,
        "generated_at": _now(),
        "seconds": round(seconds, 3),
        "ok": all(e["status"] in (RAN, UP_TO_DATE) for e in steps),
        "counts": {s: sum(e["status"] == s for e in steps) for s in (RAN, UP_TO_DATE, FAILED, NOT_RUN)},
        "steps": steps,
        "artifacts": artifacts,
        # targets left out of this build because this machine cannot build them (hardware)
        "skipped": [{"target": target, "why": why} for target, why in sorted(plan.skipped.items())],
        "warnings": [warning for entry in steps for warning in entry.get("warnings", [])] + latency_warnings,
    }


QUANTIZE_RULES = ("quantize_dynamic", "quantize_static", "quantize_int4")  # the rules whose facts may hold a "fallback"
FP32 = "fp32"


def attach_fallback(artifacts: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
    """Give each artifact the "fallback" facts of the quantize step in its chain (the layers it kept
    in float to meet the gates, what each one costs), when that step reported one."""
    for artifact in artifacts:
        for entry in chain(steps, artifact["target"]):
            facts = entry.get("info") or entry.get("facts") or {}
            if entry.get("rule") in QUANTIZE_RULES and isinstance(facts.get("fallback"), dict):
                artifact["fallback"] = facts["fallback"]
                break


def compare_latency(artifacts: list[dict[str, Any]], steps: list[dict[str, Any]],
                    kinds: dict[str, tuple[str | None, str | None]]) -> list[str]:
    """Put "latency_vs_fp32" on every artifact of a precision other than fp32 that has a latency
    and a fp32 artifact of its format measured on the same input shape and threads (a timing on
    another shape says nothing about this one); returns a warning per artifact slower than its fp32
    one: a quantized model that is slower than float is a surprise the user must hear about.
    kinds: target -> (format, precision), from the publishing steps' params (else the artifact's own
    "format" and "precision"). Among several fp32 artifacts the one whose chain shares the most
    steps wins, then the first by name."""
    kind = {a["target"]: kinds.get(a["target"]) or (a.get("format"), a.get("precision")) for a in artifacts}
    measured = sorted((a for a in artifacts if median_ms(a.get("latency")) is not None), key=lambda a: str(a["target"]))
    steps_of = {a["target"]: {e["step"] for e in chain(steps, a["target"])} for a in measured}
    warnings = []
    for artifact in measured:
        target, (fmt, precision) = artifact["target"], kind[artifact["target"]]
        if precision is None or precision == FP32:
            continue
        peers = [a for a in measured if kind[a["target"]] == (fmt, FP32) and same_conditions(a["latency"], artifact["latency"])]
        if not peers:
            continue
        fp32 = max(peers, key=lambda a: len(steps_of[a["target"]] & steps_of[target]))  # ties: the first by name
        ms, fp32_ms = median_ms(artifact["latency"]), median_ms(fp32["latency"])
        ratio = round(ms / fp32_ms, 3)
        artifact["latency_vs_fp32"] = {"target": fp32["target"], "ratio": ratio, "fp32_ms": fp32_ms, "ms": ms}
        warning = slower_warning(artifact, precision)
        if warning:
            warnings.append(warning)
    return warnings


def slower_warning(artifact: dict[str, Any], precision: str | None) -> str | None:
    """"int4 (int4) runs 1.26x slower than fp32 (28.5 vs 22.5 ms, shape input_ids [1, 128], 2 threads)"
    for an artifact whose "latency_vs_fp32" ratio is above 1; else None."""
    versus = artifact.get("latency_vs_fp32") or {}
    ratio, ms, fp32_ms = versus.get("ratio"), median_ms({"median_ms": versus.get("ms")}), median_ms({"median_ms": versus.get("fp32_ms")})
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1.0 or ms is None or fp32_ms is None:
        return None
    kind = f" ({precision})" if precision else ""
    conditions = conditions_text(artifact.get("latency") or {})
    measured = f"{ms:.3g} vs {fp32_ms:.3g} ms" + (f", {conditions}" if conditions else "")
    return f"{artifact['target']}{kind} runs {ratio_text(ratio)}x slower than {versus.get('target')} ({measured})"


def chain(steps: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """The report's step entries the target needs."""
    return [entry for entry in steps if target in entry.get("targets", [])]


def median_ms(latency: Any) -> float | None:
    """A latency's median, when it was measured (not {"skipped": why}) and is a positive time."""
    value = latency.get("median_ms") if isinstance(latency, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def same_conditions(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two latencies measured on the same input shapes and threads (an unrecorded shape matches none)."""
    return a.get("shape") is not None and a.get("shape") == b.get("shape") and a.get("threads") == b.get("threads")


def conditions_text(latency: dict[str, Any]) -> str:
    """'shape input_ids [1, 128], 2 threads'."""
    shape, threads = latency.get("shape"), latency.get("threads")
    parts = [] if shape is None else ["shape " + (", ".join(f"{name} {list(dims)}" for name, dims in shape.items()) if isinstance(shape, dict) else str(shape))]
    parts += [] if threads is None else [f"{threads} thread{'s' if threads != 1 else ''}"]
    return ", ".join(parts)


def ratio_text(ratio: float) -> str:
    """1.26; three decimals where two would read 1.00 (1.004 is slower, and says so)."""
    text = f"{ratio:.2f}"
    return f"{ratio:.3f}" if text == "1.00" else text


def noop_report(plan: Plan) -> dict[str, Any]:
    """The report a build that found every step of the plan up to date writes."""
    return build_report(plan, dict.fromkeys((s.name for s in plan.steps), UP_TO_DATE), 0.0)


def write_report(root: Path, report: dict[str, Any]) -> str:
    """Write a manifest's report; returns its summary line."""
    path = report_path(root, report["model"])
    _write(path, dumps_by_line(report))
    return summary_line(root, report["model"], report["counts"])


def report_template(report: dict[str, Any]) -> str:
    """A no-op report encoded once, its time and seconds left as placeholders (kiln.state.fresh keeps it)."""
    return dumps_by_line(dict(report, generated_at=_GENERATED_AT, seconds=_SECONDS))


def publish_unchanged(root: Path, templates: list[tuple[str, int, str]], started: float) -> list[str]:
    """Write the no-op report of each unchanged manifest ((model, steps, template) from its fresh
    entry: what the full check would have written) and return their summary lines."""
    now, seconds = json.dumps(_now()), json.dumps(round(time.monotonic() - started, 3))
    lines = []
    for model, steps, template in templates:
        _write(report_path(root, model), template.replace(json.dumps(_GENERATED_AT), now, 1).replace(json.dumps(_SECONDS), seconds, 1))
        lines.append(summary_line(root, model, {RAN: 0, UP_TO_DATE: steps, FAILED: 0, NOT_RUN: 0}))
    return lines


def summary_line(root: Path, model: str, counts: dict[str, int]) -> str:
    not_run = f", {counts[NOT_RUN]} not run" if counts.get(NOT_RUN) else ""
    return (f"kiln: {model}: {counts[RAN]} ran, {counts[UP_TO_DATE]} up to date, {counts[FAILED]} failed{not_run}"
            f" -> {report_path(root, model).relative_to(root)}")


def _write(path: Path, text: str) -> None:
    """Informative (the lockfile is the durable record): atomic, no fsync, and no comparison with
    the file there, which always differs (generated_at)."""
    write_bytes_atomic(path, text.encode())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
