"""What a step cost, as run_step measures it (kiln.execute.resources.metered) and report.json shows it,
and the memory reservation learned from it (kiln.execute.resources.reservation_mib).

The build runs in a fresh Python process (this file run as a script): peak RSS is a process-wide
fact, and this pytest process may hold whatever earlier tests imported. In it, one step allocates
200 MiB; a small step then runs in the same process and must not inherit that peak (the process's
lifetime maximum, ru_maxrss, would say 200 MiB); a step spawns a child process that burns CPU and
holds 200 MiB, both counted; a step declared a little above what it uses is warned about. A second
build of the same workspace reserves what the first run used plus 10%. In this process: steps that
ran side by side in threads of one process are reported as sharing their numbers, and nothing is
learned from them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kiln.execute.resources import reservation_mib
from kiln.execute.step import run_step
from kiln.plan.steps import Plan, Step, identity
from kiln.rules import Params, Rule, RunContext, register
from kiln.state.records import observed_path, read_record
from kiln.state.report import RAN, build_report, memory_warning, report_path, write_report

ALLOC, SPAWN = "test_usage_alloc", "test_usage_spawn"
MIB = 1 << 20
CHILD_CPU_S = 0.6
PEERS = threading.Barrier(2)  # steps that must run at the same time in threads of this process


class UsageParams(Params):
    mib: int = 0  # allocated and written (so resident) while the rule runs
    declared_mib: int = 64  # what the rule says it needs
    with_peer: bool = False  # waits at PEERS, so two steps overlap


class _UsageRule(Rule):
    tools: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[int] = 1
    Params: ClassVar[type[Params]] = UsageParams

    @classmethod
    def memory_mib(cls, params: dict[str, Any], input_bytes: int) -> int:
        return UsageParams.model_validate(params).declared_mib


@register
class Alloc(_UsageRule):
    name: ClassVar[str] = ALLOC

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: UsageParams, ctx: RunContext) -> dict[str, Any]:
        block = b"\x01" * (params.mib * MIB)
        if params.with_peer:
            PEERS.wait(timeout=30)
        time.sleep(0.2)  # long enough for the sampler too, where the kernel cannot reset the process's peak
        outputs["out"].write_text(str(len(block)))
        return {}


@register
class Spawn(_UsageRule):
    name: ClassVar[str] = SPAWN

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: UsageParams, ctx: RunContext) -> dict[str, Any]:
        code = (f"import time\nblock = b'\\x01' * ({params.mib} << 20)\nstart = time.process_time()\n"
                f"while time.process_time() - start < {CHILD_CPU_S}:\n    pass\n")
        subprocess.run([sys.executable, "-c", code], check=True)
        outputs["out"].write_text("spawned")
        return {}


def make_step(root: Path, target: str, rule: str = ALLOC, **params: Any) -> Step:
    inputs = {"text": (root / "in.txt",)}
    step_id = f"{rule}-{identity(rule, params, inputs, root)[:12]}"
    return Step(id=step_id, rule=rule, params=params, inputs=inputs, outputs={"out": root / "build" / ".steps" / step_id / "out.txt"},
                model="m", targets=[target])


def make_steps(root: Path) -> dict[str, Step]:
    """big: 200 MiB but declares 1; small: nothing, after big in the same process; near: 200 MiB,
    declares 215 (within 10%); child: its child process holds 200 MiB and burns CPU (declares 512)."""
    return {"big": make_step(root, "big", mib=200, declared_mib=1), "small": make_step(root, "small"),
            "near": make_step(root, "near", mib=200, declared_mib=215), "child": make_step(root, "child", SPAWN, mib=200, declared_mib=512)}


def build(root: Path, names: list[str], copy_to: str) -> None:
    """Run the steps in this process, write the report, keep a copy of it as root/<copy_to>."""
    steps = make_steps(root)
    for name in names:
        assert run_step(steps[name], root) == {"key": read_record(root, steps[name]).key}
    plan = Plan("m", root / "m.toml", root, [steps[n] for n in names])
    write_report(root, build_report(plan, dict.fromkeys((s.name for s in plan.steps), RAN), 1.0))
    (root / copy_to).write_text(report_path(root, "m").read_text())


def steps_of(report: dict) -> dict[str, dict]:
    return {entry["targets"][0]: entry for entry in report["steps"]}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A first build of every step and a second of big and near, in one fresh process."""
    root = tmp_path_factory.mktemp("usage")
    (root / "in.txt").write_text("input")
    env = os.environ | {"KILN_CACHE": "off"}  # rules must run, not be restored
    done = subprocess.run([sys.executable, __file__, str(root)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return root, json.loads((root / "first.json").read_text()), json.loads((root / "second.json").read_text())


def test_a_step_that_allocates_200_mib_shows_it_and_a_small_one_after_it_does_not(reports):
    _, first, _ = reports
    big, small = steps_of(first)["big"], steps_of(first)["small"]
    assert big["peak_rss_mib"] >= 200 and big["used_mib"] >= 200 and big["last_run_peak_rss_mib"] == big["peak_rss_mib"]
    assert small["peak_rss_mib"] < 200 and small["used_mib"] < 50  # not the process's lifetime maximum
    assert big["exclusive"] and small["exclusive"] and big["cpu_seconds"] >= 0 and big["seconds"] > 0


def test_a_child_process_counts_in_cpu_time_and_peak_rss(reports):
    _, first, _ = reports
    child = steps_of(first)["child"]
    assert child["cpu_seconds"] >= CHILD_CPU_S  # the parent only waited: the time is the child's
    assert child["peak_rss_mib"] >= 200 and child["used_mib"] >= 200


def test_steps_over_or_near_their_reservation_are_warned_about(reports):
    _, first, _ = reports
    entries = steps_of(first)
    assert "more than the 1 MiB it reserved" in entries["big"]["warnings"][0]
    assert "within 10% of the 215 MiB it reserved" in entries["near"]["warnings"][0]
    assert "warnings" not in entries["small"] and "warnings" not in entries["child"]
    assert first["warnings"] == [w for name in ("big", "near") for w in entries[name]["warnings"]]
    assert first["warnings"][0].startswith("m/big/test_usage_alloc: used ")


def test_each_step_says_when_it_started_for_a_timeline(reports):
    _, first, second = reports
    starts = [entry["started_at"] for entry in first["steps"]]  # in the order they ran
    assert starts == sorted(starts) and len(set(starts)) == 4 and steps_of(second)["big"]["started_at"] > starts[-1]
    assert all(abs(entry["started_at"] - time.time()) < 600 for entry in first["steps"])


def test_the_next_build_reserves_what_the_step_used_plus_ten_percent(reports):
    root, first, second = reports
    steps = make_steps(root)
    for name in ("big", "near"):
        learned = math.ceil(steps_of(first)[name]["used_mib"] * 1.1)
        assert learned > steps[name].params["declared_mib"]
        assert steps_of(second)[name]["reserved_mib"] == learned
    small = steps["small"]
    assert reservation_mib(root, small, 64) == 64  # it used less than it declared: the declaration stands
    assert reservation_mib(root, steps["big"], 1) == math.ceil(steps_of(second)["big"]["used_mib"] * 1.1)


def test_up_to_date_steps_keep_their_last_runs_cost(reports):
    root, first, _ = reports
    steps = make_steps(root)
    plan = Plan("m", root / "m.toml", root, [steps["big"]])
    up_to_date = build_report(plan, {steps["big"].name: "up to date"}, 0.0)
    entry = up_to_date["steps"][0]
    assert entry["status"] == "up to date" and "cpu_seconds" not in entry and "warnings" not in entry and up_to_date["warnings"] == []
    assert entry["last_run_peak_rss_mib"] >= 200 and entry["last_run_reserved_mib"] > 1 and entry["last_run_cpu_seconds"] >= 0


def test_the_warning_threshold_is_ten_percent_of_what_was_used():
    assert memory_warning("s", {"used_mib": 90.0, "reserved_mib": 100, "exclusive": True}) is None
    assert "within 10% of the 100 MiB" in memory_warning("s", {"used_mib": 91.0, "reserved_mib": 100, "exclusive": True})
    assert "more than the 100 MiB" in memory_warning("s", {"used_mib": 120.0, "reserved_mib": 100, "exclusive": True})
    assert memory_warning("s", {"used_mib": 120.0, "reserved_mib": 100, "exclusive": False}) is None
    assert memory_warning("s", {"used_mib": 120.0, "reserved_mib": None, "exclusive": True}) is None


def test_steps_that_overlap_in_threads_share_their_numbers_and_teach_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", "off")
    (tmp_path / "in.txt").write_text("input")
    steps = [make_step(tmp_path, target, declared_mib=1, with_peer=True) for target in ("a", "b")]
    threads = [threading.Thread(target=run_step, args=(step, tmp_path)) for step in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for step in steps:
        record = read_record(tmp_path, step)
        assert record is not None and record.usage["exclusive"] is False and record.usage["reserved_mib"] == 1
        assert not observed_path(tmp_path, step).exists() and reservation_mib(tmp_path, step, 1) == 1
    entry = build_report(Plan("m", tmp_path / "m.toml", tmp_path, steps), dict.fromkeys((s.name for s in steps), RAN), 1.0)["steps"][0]
    assert entry["exclusive"] is False and "warnings" not in entry


def test_a_step_restored_from_the_cache_reserved_nothing_and_teaches_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", "on")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "in.txt").write_text("input")
    step = make_step(tmp_path, "t")
    run_step(step, tmp_path)
    learned = observed_path(tmp_path, step).read_bytes()
    step.outputs["out"].unlink()
    run_step(step, tmp_path)
    record = read_record(tmp_path, step)
    assert record.data["restored"] is True and record.usage["reserved_mib"] is None and "cpu_seconds" in record.usage
    assert observed_path(tmp_path, step).read_bytes() == learned


if __name__ == "__main__":  # the fixture's build, in a fresh process
    workspace = Path(sys.argv[1])
    build(workspace, ["big", "small", "near", "child"], "first.json")
    build(workspace, ["big", "near"], "second.json")
