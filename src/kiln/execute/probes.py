"""The end of a build: the latency probes validate steps left for a quiet machine
(kiln.runtime.probes), measured one after the other while nothing else runs, written into the
steps' records (what the report reads) and local cache entries (what a restore brings back)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.base.fsio import write_json_atomic
from kiln.runtime import probes
from kiln.state.cache import Cache
from kiln.state.records import read_record, record_path

if TYPE_CHECKING:
    from kiln.plan.steps import Step


def run_deferred(root: Path, steps: dict[str, Step]) -> int:
    """Measure every waiting request whose step (by name, among `steps`) still holds its
    placeholder; drop the others. Returns how many were measured."""
    measured = 0
    for request in probes.requests(root):
        token = request["token"]
        try:
            step = steps.get(request.get("step", ""))
            record = read_record(root, step) if step is not None else None
            if record is not None and (record.info.get("latency") or {}).get("deferred") == token:
                latency = _measure(root, request)
                _patch(root, step, record.data, latency, token)
                measured += 1
        finally:
            probes.drop(root, token)
    return measured


def _measure(root: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    from kiln.build_rules.validate import probe
    from kiln.formats import target_format

    try:
        sample = probes.sample_of(root, request["token"])
    except (OSError, ValueError) as err:
        return {"skipped": f"latency not measured: its sample could not be read back ({err})"}
    return probe(target_format(request["format"]), root / request["artifact"], sample)


def _patch(root: Path, step: Step, data: dict[str, Any], latency: dict[str, Any] | None, token: str) -> None:
    info = {k: v for k, v in data["info"].items() if k != "latency"} | ({"latency": latency} if latency else {})
    write_json_atomic(record_path(root, step), {**data, "info": info})
    cache = Cache.for_root(root)
    entry = cache.get_entry(data["key"]) if cache is not None else None
    if entry is not None and ((entry.get("info") or {}).get("latency") or {}).get("deferred") == token:
        cache.put_entry(data["key"], {**entry, "info": info})
