"""kiln.execute.step.run_step: running one step in-process, on steps built by hand in a throwaway
workspace with a small rule registered here (test_copy_upper: upper-cases a text file).

Covers: the rule's output lands at the step's path and the record holds key, components, outputs
(workspace-relative path, sha256, bytes), reason and the rule's facts; the rule writes beside its
output, which changes only once the rule has returned; a rerun of an up-to-date step says it was
forced; with the cache on, a step whose key is cached is restored without running the rule; a
StepError fails doit's task, writes the failure file and leaves no temp file, no empty output folder,
and the earlier output and record as they were (a later success removes the failure file); any other
exception fails the step the same way, on one line "<step>: <type>: <message> (at <file:line>) (log:
<path>)" with its traceback in the step's log (KeyboardInterrupt still stops the build); a rule that
does not write an output fails its step; what a rule prints, logs and warns (and, in the main thread,
what is written to file descriptors 1 and 2) goes to the log, not the terminal, and steps run in
threads keep their logs apart; the "last run" baseline is written for every (model, target) that
shares the step; a running step holds its rule's memory reservation (released on failure too) and,
for torch rules, the process-wide torch lock."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
from doit.exceptions import TaskFailed

from kiln.base.paths import state_dir
from kiln.errors import StepError
from kiln.execute import step as step_module
from kiln.execute.step import run_step
from kiln.plan.steps import Step, identity
from kiln.rules import Params, Rule, RunContext, register
from kiln.state.records import failure_path, last_path, log_path, read_record, record_path
from kiln.state.uptodate import components, is_up_to_date, step_key, why

RULE = "test_copy_upper"
TORCH_RULE = "test_copy_upper_torch"


class CopyUpperParams(Params):
    suffix: str = ""


# What each run of the rule saw: step name, the paths it was given, and the state around it.
RUNS: list[dict[str, Any]] = []


@register
class CopyUpper(Rule):
    """Writes its input upper-cased (plus the suffix) to every output role. The input's text steers
    it: "step error" -> StepError, "crash" -> ValueError, "interrupt" -> KeyboardInterrupt (all after
    writing part of the output), "skip:<role>" -> does not write that role, "noise" -> prints, logs,
    warns and writes to file descriptor 2 as libraries do, first."""

    name: ClassVar[str] = RULE
    version: ClassVar[int] = 1
    tools: ClassVar[tuple[str, ...]] = ("numpy",)
    Params: ClassVar[type[Params]] = CopyUpperParams
    memory_base_mib: ClassVar[int] = 7
    memory_per_input: ClassVar[float] = 0.0

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: CopyUpperParams, ctx: RunContext) -> dict[str, Any]:
        text = inputs["text"][0].read_text()
        ledger = state_dir(ctx.root) / "memory.json"
        RUNS.append({
            "step": ctx.step, "root": ctx.root, "outputs": dict(outputs), "torch_lock": step_module._torch_lock.locked(),
            "ledger": json.loads(ledger.read_text()) if ledger.exists() else {},
        })
        if "noise" in text:
            make_noise(text)
        for role, path in outputs.items():
            if f"skip:{role}" in text:
                continue
            if "step error" in text or "crash" in text or "interrupt" in text:
                path.write_text("half an out")
                if "step error" in text:
                    raise StepError(ctx.step, "the text says no", facts={"lines": text.count("\n") + 1})
                if "interrupt" in text:
                    raise KeyboardInterrupt
                raise ValueError("a bug in the rule")
            path.write_text(text.upper() + params.suffix)
        return {"chars": len(text)}


def make_noise(tag: str) -> None:
    """What libraries do while a rule runs: print, log through a logger, warn, and write to fd 2 from native code."""
    print(f"printed {tag}")
    logging.getLogger("some.library").warning("logged %s", tag)
    warnings.warn(f"warned {tag}", UserWarning, stacklevel=1)
    sys.stderr.write(f"stderr {tag}\n")
    os.write(2, f"fd2 {tag}\n".encode())


@register
class CopyUpperTorch(CopyUpper):
    name: ClassVar[str] = TORCH_RULE
    tools: ClassVar[tuple[str, ...]] = ("torch",)


@pytest.fixture(autouse=True)
def no_cache(monkeypatch):
    """Rules must be seen to run unless a test turns the cache on."""
    monkeypatch.setenv("KILN_CACHE", "off")
    monkeypatch.delenv("KILN_CACHE_DIR", raising=False)
    RUNS.clear()


def source(root: Path) -> Path:
    return root / "src" / "in.txt"


def write_source(root: Path, text: str) -> Path:
    """The step's input, with an mtime the digest cache cannot mistake for an earlier version's."""
    path = source(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.stat().st_mtime_ns if path.exists() else None
    path.write_text(text)
    if before is not None:
        os.utime(path, ns=(before + 10**9, before + 10**9))
    return path


def make_step(root: Path, params: dict | None = None, model: str = "m", targets: tuple[str, ...] = ("t",), rule: str = RULE,
              roles: tuple[str, ...] = ("text",), shared_with: tuple[tuple[str, str], ...] = ()) -> Step:
    """A step as the planner makes it: id from rule, params and input paths; outputs in build/.steps/<id>/."""
    params = {} if params is None else params
    inputs = {"text": (source(root),)}
    step_id = f"{rule}-{identity(rule, params, inputs, root)[:12]}"
    folder = root / "build" / ".steps" / step_id
    return Step(id=step_id, rule=rule, params=params, inputs=inputs, outputs={role: folder / f"{role}.txt" for role in roles},
                model=model, targets=list(targets), shared_with=list(shared_with))


def temps_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "build").rglob(".*.kiln-*.tmp"))


def ledger(root: Path) -> dict:
    return json.loads((state_dir(root) / "memory.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- a step that runs -----------------------------------------------------------------------------

def test_the_rules_output_lands_at_the_steps_path_with_its_record(tmp_path: Path):
    write_source(tmp_path, "hello kiln")
    step = make_step(tmp_path, {"suffix": "!"})
    result = run_step(step, tmp_path)
    out = step.outputs["text"]
    assert out.read_text() == "HELLO KILN!"
    current = components(step, tmp_path)
    assert result == {"key": step_key(current)}
    record = read_record(tmp_path, step)
    assert record is not None and record.key == step_key(current) and record.components == current
    assert record.components["params"] == {"suffix": "!"} and set(record.tools) == {"kiln", "numpy"}
    assert record.outputs == {"text": {"path": f"build/.steps/{step.id}/text.txt", "sha256": sha256(out), "bytes": len("HELLO KILN!")}}
    assert record.reason == "not built yet" and record.info == {"chars": 10}
    assert record.data["step"] == "m/t/test_copy_upper" and record.data["id"] == step.id and record.data["restored"] is False
    assert not failure_path(tmp_path, step).exists() and temps_under(tmp_path) == []
    assert is_up_to_date(step, tmp_path)


def test_the_rule_writes_beside_its_output_which_changes_only_when_the_rule_returns(tmp_path: Path, monkeypatch):
    write_source(tmp_path, "first")
    step = make_step(tmp_path)
    run_step(step, tmp_path)
    write_source(tmp_path, "second version")
    RUNS.clear()
    seen_during_run = []
    original = CopyUpper.run

    def watching(self, inputs, outputs, params, ctx):
        seen_during_run.append(step.outputs["text"].read_text())
        return original(self, inputs, outputs, params, ctx)

    monkeypatch.setattr(CopyUpper, "run", watching)
    run_step(step, tmp_path)
    given = RUNS[0]["outputs"]["text"]
    assert given != step.outputs["text"] and given.parent == step.outputs["text"].parent and given.name.startswith(".")
    assert seen_during_run == ["FIRST"]  # readers saw the old output while the rule ran
    assert step.outputs["text"].read_text() == "SECOND VERSION" and not given.exists()
    assert read_record(tmp_path, step).reason.startswith("input text/in.txt changed: sha256:")


def test_a_rerun_of_an_up_to_date_step_says_it_was_forced(tmp_path: Path):
    write_source(tmp_path, "same")
    step = make_step(tmp_path)
    run_step(step, tmp_path)
    run_step(step, tmp_path)  # doit -a, or a task named on the command line
    assert len(RUNS) == 2
    assert read_record(tmp_path, step).reason == "forced (doit -a or an explicit request)"


# ---- the cache ------------------------------------------------------------------------------------

def test_a_cached_key_is_restored_without_running_the_rule(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KILN_CACHE")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))  # one cache for two clones
    first, clone = tmp_path / "first", tmp_path / "clone"
    for root in (first, clone):
        write_source(root, "cached text")
    built = make_step(first)
    run_step(built, first)
    assert len(RUNS) == 1 and any((tmp_path / "cache").rglob("*.json"))
    step = make_step(clone)
    assert step.id == built.id
    result = run_step(step, clone)
    assert len(RUNS) == 1  # the rule did not run again
    assert step.outputs["text"].read_text() == "CACHED TEXT"
    record = read_record(clone, step)
    assert result == {"key": record.key} and record.key == read_record(first, built).key
    assert record.data["restored"] is True and record.reason.endswith("restored from the cache")
    assert record.info == {"chars": 11}  # the facts the rule gave when it ran
    assert record.outputs["text"]["sha256"] == sha256(step.outputs["text"])
    assert is_up_to_date(step, clone)


# ---- failures ---------------------------------------------------------------------------------------

def test_a_step_error_fails_the_task_and_leaves_nothing_behind(tmp_path: Path):
    write_source(tmp_path, "a step error\nin two lines")
    step = make_step(tmp_path)
    result = run_step(step, tmp_path)
    assert isinstance(result, TaskFailed)
    assert "m/t/test_copy_upper: the text says no" in result.get_msg()
    failure = json.loads(failure_path(tmp_path, step).read_text())
    assert failure["step"] == "m/t/test_copy_upper" and failure["error"] == "m/t/test_copy_upper: the text says no"
    assert failure["reason"] == "not built yet" and failure["facts"] == {"lines": 2}
    assert temps_under(tmp_path) == []
    assert not step.outputs["text"].parent.exists()  # no empty output folder
    assert read_record(tmp_path, step) is None and not record_path(tmp_path, step).exists()
    assert ledger(tmp_path) == {}  # its memory reservation was given back


def test_a_failed_rerun_keeps_the_earlier_output_and_record_until_a_good_one(tmp_path: Path):
    write_source(tmp_path, "good")
    step = make_step(tmp_path)
    run_step(step, tmp_path)
    good = read_record(tmp_path, step).data
    write_source(tmp_path, "now a step error")
    assert isinstance(run_step(step, tmp_path), TaskFailed)
    assert step.outputs["text"].read_text() == "GOOD"
    assert read_record(tmp_path, step).data == good
    assert json.loads(failure_path(tmp_path, step).read_text())["reason"].startswith("input text/in.txt changed: ")
    assert temps_under(tmp_path) == []
    write_source(tmp_path, "fixed")
    assert not isinstance(run_step(step, tmp_path), TaskFailed)
    assert step.outputs["text"].read_text() == "FIXED" and not failure_path(tmp_path, step).exists()


def test_any_other_exception_fails_the_step_on_one_line_with_its_traceback_in_the_log(tmp_path: Path):
    write_source(tmp_path, "crash")
    step = make_step(tmp_path)
    result = run_step(step, tmp_path)
    assert isinstance(result, TaskFailed)
    log = f"build/.kiln/logs/{step.id}.log"
    here = Path(__file__).name
    line = result.get_msg().strip()
    assert "\n" not in line and line.startswith("m/t/test_copy_upper: ValueError: a bug in the rule (at ") and line.endswith(f") (log: {log})")
    assert here in line  # where the bug is: the rule's file and line
    assert result.kiln_line == line  # what kiln.engine.reporter prints
    failure = json.loads(failure_path(tmp_path, step).read_text())
    assert failure["error"] == line.removesuffix(f" (log: {log})") and failure["log"] == log
    text = (tmp_path / log).read_text()
    assert text.startswith("m/t/test_copy_upper: test_copy_upper v1, not built yet\n")
    assert "Traceback (most recent call last):" in text and 'raise ValueError("a bug in the rule")' in text and text.rstrip().endswith("ValueError: a bug in the rule")
    assert temps_under(tmp_path) == [] and not step.outputs["text"].parent.exists()
    assert read_record(tmp_path, step) is None
    assert ledger(tmp_path) == {}


def test_an_exception_in_a_rerun_keeps_the_earlier_output(tmp_path: Path):
    write_source(tmp_path, "good")
    step = make_step(tmp_path)
    run_step(step, tmp_path)
    good = read_record(tmp_path, step).data
    write_source(tmp_path, "crash now")
    assert isinstance(run_step(step, tmp_path), TaskFailed)
    assert step.outputs["text"].read_text() == "GOOD" and read_record(tmp_path, step).data == good
    assert temps_under(tmp_path) == []


def test_keyboard_interrupt_still_stops_the_build_and_leaves_no_temp(tmp_path: Path):
    write_source(tmp_path, "interrupt")
    step = make_step(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_step(step, tmp_path)
    assert temps_under(tmp_path) == [] and not failure_path(tmp_path, step).exists()
    assert "KeyboardInterrupt" in log_path(tmp_path, step).read_text()


def test_a_rule_that_does_not_write_its_output_fails_its_step(tmp_path: Path):
    write_source(tmp_path, "skip:text")
    step = make_step(tmp_path)
    result = run_step(step, tmp_path)
    assert isinstance(result, TaskFailed)
    assert "m/t/test_copy_upper: RuntimeError: rule test_copy_upper did not write its output 'text'" in result.get_msg()
    assert read_record(tmp_path, step) is None and not step.outputs["text"].exists()
    assert not step.outputs["text"].parent.exists()  # no empty output folder


def test_a_rule_that_writes_only_one_of_two_outputs_publishes_neither_and_leaves_no_temp(tmp_path: Path):
    write_source(tmp_path, "skip:copy")
    step = make_step(tmp_path, roles=("text", "copy"))
    result = run_step(step, tmp_path)
    assert isinstance(result, TaskFailed) and "did not write its output 'copy'" in result.get_msg()
    assert not step.outputs["text"].exists() and read_record(tmp_path, step) is None
    assert temps_under(tmp_path) == []


# ---- what a rule prints goes to its log -----------------------------------------------------------

def test_what_a_rule_prints_logs_and_warns_goes_to_its_log_not_the_terminal(tmp_path: Path, capfd):
    write_source(tmp_path, "noise one")
    step = make_step(tmp_path)
    run_step(step, tmp_path)
    out, err = capfd.readouterr()
    assert "noise one" not in out + err
    log = log_path(tmp_path, step).read_text()
    for line in ("printed noise one", "WARNING some.library: logged noise one", "UserWarning: warned noise one", "stderr noise one", "fd2 noise one"):
        assert line in log, line
    assert sys.stdout is not None and not type(sys.stdout).__name__.startswith("_Routed")  # the streams are given back
    print("after the step")
    os.write(2, b"fd2 after the step\n")
    out, err = capfd.readouterr()
    assert "after the step" in out and "fd2 after the step" in err
    assert [h for h in logging.getLogger().handlers if type(h).__name__.startswith("_Routed")] == []
    assert not type(warnings.showwarning).__name__.startswith("_Routed")
    assert "after the step" not in log_path(tmp_path, step).read_text()


def test_a_rerun_replaces_the_log_and_a_failed_one_keeps_the_output_in_it(tmp_path: Path):
    write_source(tmp_path, "noise first")
    step = make_step(tmp_path)
    run_step(step, tmp_path)
    write_source(tmp_path, "noise second, then a step error")
    result = run_step(step, tmp_path)
    log = log_path(tmp_path, step).read_text()
    assert "noise first" not in log and "printed noise second" in log and "StepError" in log
    assert result.get_msg().strip() == f"m/t/test_copy_upper: the text says no (log: build/.kiln/logs/{step.id}.log)"


def two_noisy_steps(root: Path) -> list[tuple[Path, Step]]:
    """Steps of workspaces a and b whose rules make noise tagged with their workspace."""
    steps = []
    for name in ("a", "b"):
        write_source(root / name, f"noise from {name}")
        steps.append((root / name, make_step(root / name)))
    return steps


def run_in_threads(steps: list[tuple[Path, Step]]) -> list[BaseException]:
    """Run the steps side by side in threads, as doit -P thread does; what they raised. A step still
    running after a minute fails the test: it stalled."""
    errors: list[BaseException] = []

    def run(root, step):
        try:
            run_step(step, root)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=pair, daemon=True) for pair in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a step stalled"
    return errors


def test_steps_running_in_threads_keep_their_python_output_apart(tmp_path: Path, capfd, monkeypatch):
    """doit -P thread (kiln's default): Python-level output is routed by the thread that wrote it;
    file descriptors are process-wide, so native output goes to the logs of the steps running when
    it was written (both, marked so, when two were), and none of it to the terminal."""
    steps = two_noisy_steps(tmp_path)
    barrier = threading.Barrier(2)
    original = make_noise

    def together(tag):  # both rules make their noise while both steps are running
        barrier.wait(timeout=10)
        original(tag)
        barrier.wait(timeout=10)

    monkeypatch.setattr(sys.modules[__name__], "make_noise", together)
    assert run_in_threads(steps) == []
    for (root, step), (name, other) in zip(steps, (("a", "b"), ("b", "a")), strict=True):
        log = log_path(root, step).read_text()
        assert f"printed noise from {name}" in log and f"logged noise from {name}" in log and f"warned noise from {name}" in log
        assert f"stderr noise from {name}" in log
        for kind in ("printed", "logged", "warned", "stderr"):  # Python-level: the writing thread says whose it is
            assert f"{kind} noise from {other}" not in log
        # native (fd-level) output cannot say which thread wrote it: both logs get it, marked so
        assert f"fd2 noise from {name}" in log and "[native output while 2 steps ran; it may be any one's]" in log
    out, err = capfd.readouterr()
    assert "noise" not in out and "noise" not in err  # none of it reached the terminal


def test_native_output_beyond_a_pipes_buffer_written_holding_the_gil_does_not_stall_steps_in_threads(tmp_path: Path, monkeypatch):
    """A C library that writes a lot to fd 1 without releasing the GIL (ctypes.PyDLL keeps it) while
    another step runs: the writer must never wait for a reader thread that needs the GIL (a pipe
    would fill at 64 KiB and hang the build). Every byte reaches the logs."""
    steps = two_noisy_steps(tmp_path)
    barrier = threading.Barrier(2)
    libc = ctypes.PyDLL(None)
    block = b"x" * 1023 + b"\n"

    def loud(tag):
        barrier.wait(timeout=10)
        line = f"native {tag} ".encode()
        for _ in range(256):  # 256 KiB each, four times a pipe's buffer
            libc.write(1, line + block, len(line) + len(block))
        barrier.wait(timeout=10)

    monkeypatch.setattr(sys.modules[__name__], "make_noise", loud)
    assert run_in_threads(steps) == []
    for (root, step), name in zip(steps, ("a", "b"), strict=True):
        assert log_path(root, step).read_text().count(f"native noise from {name} ") == 256


# ---- shared steps: every owner's baseline ---------------------------------------------------------

def test_the_last_run_baseline_is_written_for_every_owner_of_a_shared_step(tmp_path: Path):
    write_source(tmp_path, "shared")
    step = make_step(tmp_path, {"suffix": "?"}, model="a", targets=("x", "y"), shared_with=(("b", "z"),))
    run_step(step, tmp_path)
    current = components(step, tmp_path)
    for model, target in (("a", "x"), ("a", "y"), ("b", "z")):
        path = last_path(tmp_path, step, target, model)
        assert json.loads(path.read_text()) == current, (model, target)
    # so when manifest b alone changes the parameter, its new step is explained against that run
    changed = make_step(tmp_path, {"suffix": "!"}, model="b", targets=("z",))
    assert changed.id != step.id
    assert why(changed, tmp_path) == "parameter changed: params.suffix: '?' -> '!'"


# ---- what surrounds the rule while it runs -------------------------------------------------------

def test_a_running_step_holds_its_rules_memory_reservation(tmp_path: Path):
    write_source(tmp_path, "memory")
    step = make_step(tmp_path)
    run_step(step, tmp_path)
    (entry,) = RUNS[0]["ledger"].values()
    assert entry == {"pid": os.getpid(), "mib": 7, "step": "m/t/test_copy_upper"}
    assert ledger(tmp_path) == {}


def test_only_torch_steps_run_under_the_process_wide_torch_lock(tmp_path: Path):
    write_source(tmp_path, "locks")
    run_step(make_step(tmp_path), tmp_path)
    run_step(make_step(tmp_path, rule=TORCH_RULE), tmp_path)
    assert [(r["step"], r["torch_lock"]) for r in RUNS] == [("m/t/test_copy_upper", False), ("m/t/test_copy_upper_torch", True)]
    assert not step_module._torch_lock.locked()


def test_a_step_whose_tools_are_not_imported_yet_imports_them_first_one_step_at_a_time(tmp_path: Path, monkeypatch):
    """Two threads importing a package for the first time at once can meet it half-initialized
    (sklearn_iris's two steps: "cannot import name 'clone' from partially initialized module"). A
    step imports its missing tools under the imports lock first; once they are loaded it never waits."""
    write_source(tmp_path, "imports")
    monkeypatch.delitem(sys.modules, "json", raising=True)  # a tool of this rule that this process has "not imported yet"
    monkeypatch.setattr(CopyUpper, "tools", ("numpy", "json"))
    monkeypatch.setattr(step_module, "_modules_of", lambda tools: [t for t in tools if t in ("numpy", "json")])
    done = threading.Event()
    with step_module._imports_lock:  # another step imports its tools
        thread = threading.Thread(target=lambda: (run_step(make_step(tmp_path), tmp_path), done.set()), daemon=True)
        thread.start()
        assert not done.wait(1.0), "the step imported its missing tool while another step imported"
    assert done.wait(30)
    assert "json" in sys.modules and [r["torch_lock"] for r in RUNS] == [False]
    RUNS.clear()
    with step_module._imports_lock:  # now loaded: the step runs while another imports
        run_step(make_step(tmp_path, {"suffix": "!"}), tmp_path)
    assert len(RUNS) == 1


def test_waiting_torch_steps_take_the_torch_lock_in_the_builds_order():
    """The ONNX export heads the longest chain: it goes before reference_outputs, queued first."""
    lock, order = step_module._TorchLock(), []
    lock.ranks = {"m/t/export_onnx": 0, "m/t/reference_outputs": 5}

    def torch_step(name):
        with lock.turn(name):
            order.append(name)

    with lock.turn():  # a torch step runs; two more wait
        threads = [threading.Thread(target=torch_step, args=(name,), daemon=True) for name in ("m/t/reference_outputs", "m/t/export_onnx")]
        for waiting, thread in enumerate(threads, start=1):
            thread.start()
            while len(lock._waiting) < waiting:
                time.sleep(0.01)
    for thread in threads:
        thread.join(10)
    assert order == ["m/t/export_onnx", "m/t/reference_outputs"] and not lock.locked()


def test_tools_map_to_the_modules_their_distributions_install():
    assert step_module._modules_of(("scikit-learn", "numpy", "onnx")) == ["sklearn", "numpy", "onnx"]
    assert step_module._modules_of(("torch",)) == ["torch"]  # not torchgen or functorch beside it
    assert step_module._modules_of(("java", "toolenv:litert-torch", "no-such-distribution")) == []


# ---- a rule whose output is a folder (model.mlpackage, a SavedModel) --------------------------------

FOLDER_RULE = "test_write_folder"


@register
class WriteFolder(Rule):
    """Writes a folder at its output path: one file per line "<relative path>=<text>" of its input.
    A line "link:<relative path>" makes that a symlink to the input instead; "fail" raises a
    StepError after writing part of the folder."""

    name: ClassVar[str] = FOLDER_RULE
    version: ClassVar[int] = 1
    tools: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[Params]] = CopyUpperParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: CopyUpperParams, ctx: RunContext) -> dict[str, Any]:
        RUNS.append({"step": ctx.step, "outputs": dict(outputs)})
        folder = outputs["model"]
        for line in inputs["text"][0].read_text().splitlines():
            if line == "fail":
                raise StepError(ctx.step, "the text says no")
            if line.startswith("link:"):
                (folder / line[5:]).parent.mkdir(parents=True, exist_ok=True)
                (folder / line[5:]).symlink_to(inputs["text"][0])
                continue
            rel, text = line.split("=", 1)
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        return {"files": len(list(folder.rglob("*")))}


def folder_step(root: Path) -> Step:
    """A step whose one output, build/.steps/<id>/model.pkg, is a folder."""
    inputs = {"text": (source(root),)}
    step_id = f"{FOLDER_RULE}-{identity(FOLDER_RULE, {}, inputs, root)[:12]}"
    return Step(id=step_id, rule=FOLDER_RULE, params={}, inputs=inputs, outputs={"model": root / "build" / ".steps" / step_id / "model.pkg"},
                model="m", targets=["t"])


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_digest_by_hand(files: dict[str, bytes]) -> str:
    listing = "".join(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n" for rel, data in sorted(files.items()))
    return hashlib.sha256(b"kiln-tree-v1\0" + listing.encode()).hexdigest()


def test_a_folder_output_lands_whole_with_its_tree_digest_bytes_and_files_in_the_record(tmp_path: Path):
    write_source(tmp_path, "Manifest.json={}\nData/model.bin=weights\nData/deep/w.bin=more")
    step = folder_step(tmp_path)
    assert not isinstance(run_step(step, tmp_path), TaskFailed)
    out = step.outputs["model"]
    assert tree(out) == {"Data/deep/w.bin": "more", "Data/model.bin": "weights", "Manifest.json": "{}"}
    given = RUNS[0]["outputs"]["model"]
    assert given != out and given.name.startswith(".") and not given.exists()  # written at a temp path, moved in whole
    record = read_record(tmp_path, step).outputs["model"]
    assert record["path"] == f"build/.steps/{step.id}/model.pkg" and record["bytes"] == 2 + 7 + 4
    assert record["sha256"] == tree_digest_by_hand({"Manifest.json": b"{}", "Data/model.bin": b"weights", "Data/deep/w.bin": b"more"})
    assert record["files"] == [["Data/deep/w.bin", sha256(out / "Data/deep/w.bin"), 4], ["Data/model.bin", sha256(out / "Data/model.bin"), 7],
                               ["Manifest.json", sha256(out / "Manifest.json"), 2]]
    assert is_up_to_date(step, tmp_path) and temps_under(tmp_path) == []


def test_a_rerun_replaces_the_folder_whole_never_merging_into_it(tmp_path: Path):
    write_source(tmp_path, "a.txt=one\nold/b.txt=two")
    step = folder_step(tmp_path)
    run_step(step, tmp_path)
    write_source(tmp_path, "a.txt=ONE")
    run_step(step, tmp_path)
    assert tree(step.outputs["model"]) == {"a.txt": "ONE"}  # old/b.txt went with the old folder
    assert temps_under(tmp_path) == [] and is_up_to_date(step, tmp_path)


def test_a_failed_rerun_leaves_the_previous_folder_intact_and_no_temp_folder(tmp_path: Path):
    write_source(tmp_path, "a.txt=good")
    step = folder_step(tmp_path)
    run_step(step, tmp_path)
    good = read_record(tmp_path, step).data
    write_source(tmp_path, "a.txt=half written\nfail")
    assert isinstance(run_step(step, tmp_path), TaskFailed)
    assert tree(step.outputs["model"]) == {"a.txt": "good"} and read_record(tmp_path, step).data == good
    assert temps_under(tmp_path) == []


def test_a_symlink_in_a_folder_output_fails_the_step_on_one_line_naming_it(tmp_path: Path):
    write_source(tmp_path, "a.txt=fine\nlink:Data/weights.bin")
    step = folder_step(tmp_path)
    result = run_step(step, tmp_path)
    assert isinstance(result, TaskFailed)
    line = result.get_msg().strip()
    assert "\n" not in line and line.startswith("m/t/test_write_folder: output 'model' (model.pkg) holds Data/weights.bin, a symbolic link (to ")
    assert "a folder artifact may hold only regular files and folders" in line
    assert not step.outputs["model"].exists() and temps_under(tmp_path) == [] and read_record(tmp_path, step) is None


def test_a_file_edited_added_or_removed_in_a_folder_output_makes_the_step_out_of_date_naming_it(tmp_path: Path):
    write_source(tmp_path, "a.txt=one\nsub/b.txt=two")
    step = folder_step(tmp_path)
    run_step(step, tmp_path)
    out, path = step.outputs["model"], f"build/.steps/{step.id}/model.pkg"
    (out / "sub/b.txt").write_text("TWO")
    assert why(step, tmp_path) == f"output {path} is not what this step wrote ({path}/sub/b.txt changed; changed on disk, or built by another configuration)"
    (out / "sub/b.txt").write_text("two")
    assert is_up_to_date(step, tmp_path)  # the same bytes again
    (out / "new.txt").write_text("")
    assert why(step, tmp_path).startswith(f"output {path} is not what this step wrote ({path}/new.txt added;")
    (out / "new.txt").unlink()
    (out / "a.txt").unlink()
    assert why(step, tmp_path).startswith(f"output {path} is not what this step wrote ({path}/a.txt removed;")
    (out / "a.txt").write_text("one")
    assert is_up_to_date(step, tmp_path)
    (out / "empty").mkdir()  # an empty folder is part of the artifact (a Core ML weights/ folder)
    assert why(step, tmp_path).startswith(f"output {path} is not what this step wrote ({path}/empty/ added;")
    (out / "empty").rmdir()
    (out / "link").symlink_to(out / "a.txt")
    assert why(step, tmp_path).startswith(f"output {path} is not what this step wrote: ") and f"{path}/link is a symbolic link" in why(step, tmp_path)


def test_a_cached_folder_is_restored_with_the_same_bytes_without_running_the_rule(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KILN_CACHE")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    first, clone = tmp_path / "first", tmp_path / "clone"
    for root in (first, clone):
        write_source(root, "Manifest.json={}\nData/weight.bin=w")
    run_step(folder_step(first), first)
    step = folder_step(clone)
    run_step(step, clone)
    assert len(RUNS) == 1  # restored, not run
    assert tree(step.outputs["model"]) == tree(folder_step(first).outputs["model"])
    record, built = read_record(clone, step), read_record(first, folder_step(first))
    assert record.data["restored"] is True and record.outputs["model"]["sha256"] == built.outputs["model"]["sha256"]
    assert record.outputs["model"]["files"] == built.outputs["model"]["files"]
    assert is_up_to_date(step, clone) and temps_under(clone) == []


def test_a_symlink_in_an_input_folder_fails_the_step_on_one_line(tmp_path: Path):
    write_source(tmp_path, "a.txt=one")
    made = folder_step(tmp_path)
    run_step(made, tmp_path)
    (made.outputs["model"] / "link").symlink_to(source(tmp_path))
    inputs = {"text": (made.outputs["model"],)}
    reader = Step(id="test_copy_upper-reader", rule=RULE, params={}, inputs=inputs, outputs={"text": tmp_path / "build" / "out.txt"}, model="m", targets=["t"])
    where = f"build/.steps/{made.id}/model.pkg/link"
    assert why(reader, tmp_path).startswith(f"input {where} is a symbolic link (to ")
    result = run_step(reader, tmp_path)
    line = result.get_msg().strip()
    assert isinstance(result, TaskFailed) and line.startswith(f"m/t/test_copy_upper: input {where} is a symbolic link (to ") and "\n" not in line
    assert json.loads(failure_path(tmp_path, reader).read_text())["error"] == line and RUNS[-1]["step"] != reader.name
