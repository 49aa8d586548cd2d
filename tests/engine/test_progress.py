"""What a build prints (kiln.engine.progress, kiln.engine.summary through the reporter): outside a
terminal, one line per finished step with its time and the summary table; a rule's own output and
warnings in its step's log, never on stdout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import Workspace
from kiln.engine.progress import QUIET, VERBOSE, parse_verbosity
from kiln.errors import UsageError
from workspaces import TINYNET, tiny_workspace

# A torch source whose factory prints and warns while the reference step runs it: that output must
# land in the step's log, not between kiln's lines.
NOISY_NET = TINYNET + '''
import sys
import warnings

def noisy():
    print("NOISY-PRINT from the factory")
    print("NOISY-STDERR from the factory", file=sys.stderr)
    warnings.warn("NOISY-WARNING from a library")
    return build()
'''

STEP_LINE = re.compile(r"^\.  build:(\S+)  (\d+\.\d) s$")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Workspace, str, str]:
    ws = tiny_workspace(tmp_path_factory.mktemp("progress") / "ws", 'kind = "torch"\nfactory = "tinynet:noisy"')
    (ws.root / "tinynet.py").write_text(NOISY_NET)
    proc = ws.doit("build")
    return ws, proc.stdout, proc.stderr


def test_a_build_prints_one_line_per_finished_step_with_its_time(built):
    ws, stdout, _ = built
    ran = [m.group(1) for line in stdout.splitlines() if (m := STEP_LINE.match(line))]
    assert sorted(ran) == ws.ran("tiny") and len(ran) >= 4  # every step that ran, once, finished


def test_the_summary_table_has_one_row_per_target(built):
    ws, stdout, _ = built
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("target "))
    assert lines[header].split() == ["target", "format", "precision", "size", "latency", "worst", "mean", "gate", "status", "why"]
    assert set(lines[header + 1]) == {"-", " "}  # a plain rule under the header, no box drawing
    rows = {line.split()[0]: line for line in lines[header + 2: header + 4]}
    assert sorted(rows) == ["onnx_a", "onnx_b"]
    for row in rows.values():
        cells = row.split()
        assert cells[1:3] == ["onnx", "fp32"] and "pass" in cells and "ran" in cells
        assert re.search(r"1-cos (0|\d\.\de[-+]\d\d) ", row)  # the worst cosine of the validation, as 1 - cos
    assert "report: build/tiny/report.html" in lines
    page = (ws.root / "build/tiny/report.html").read_text()  # written by the build, with every target
    assert "onnx_a" in page and "onnx_b" in page and 'href="tiny/report.html"' in (ws.root / "build/index.html").read_text()


def test_a_rules_prints_and_warnings_go_to_the_step_log_not_stdout(built):
    ws, stdout, stderr = built
    assert "NOISY" not in stdout and "NOISY" not in stderr
    logs = "".join(p.read_text() for p in (ws.root / "build").rglob("*.log"))
    for text in ("NOISY-PRINT", "NOISY-STDERR", "NOISY-WARNING"):
        assert text in logs


def test_a_noop_build_prints_the_table_and_quiet_prints_nothing_else(built):
    ws, _, _ = built
    lines = ws.doit("build", "verbosity=quiet").stdout.splitlines()
    assert not any(line.startswith((".  ", "-- ")) for line in lines)
    rows = {line.split()[0]: line for line in lines if line.startswith("onnx_")}
    assert sorted(rows) == ["onnx_a", "onnx_b"] and all(" pass " in r and " up to date " in r for r in rows.values())
    assert any(line.startswith("kiln: tiny: 0 ran") for line in lines)


def test_verbose_adds_why_each_step_ran(built):
    ws, _, _ = built
    ws.edit("opset = 17", "opset = 18", "tiny")  # onnx_a's export and what follows rerun
    lines = ws.doit("build", "manifest=tiny", "verbosity=verbose").stdout.splitlines()
    ran = [line for line in lines if STEP_LINE.match(line.split("  (")[0])]
    assert any(re.fullmatch(r"\.  build:tiny/onnx_a/export_onnx  \d+\.\d s  \(parameter changed: params\.opset: 17 -> 18\)", line) for line in ran), lines


def test_verbosity_names_what_is_allowed():
    assert (parse_verbosity("quiet"), parse_verbosity("2"), parse_verbosity(None)) == (QUIET, VERBOSE, 1)
    with pytest.raises(UsageError, match="'loud'.*quiet, normal or verbose"):
        parse_verbosity("loud")


def test_progress_reaches_the_display_from_the_rule(tmp_path: Path):
    from kiln.engine.progress import read_progress
    from kiln.rules import RunContext

    ctx = RunContext(tmp_path, "m/t/validate")
    assert read_progress(tmp_path, "m/t/validate") is None
    ctx.progress(1, 3)
    ctx.progress(2, 3)  # within 0.1 s of the last write: skipped, the display polls slower than that
    ctx.progress(3, 3)  # the last batch is always written
    assert read_progress(tmp_path, "m/t/validate") == (3, 3)


def test_in_a_terminal_running_steps_show_their_batches_and_finished_ones_a_line(tmp_path: Path, monkeypatch):
    import os
    import pty
    import select
    import time

    from kiln.engine.progress import LiveDisplay, display_for
    from kiln.rules import RunContext

    monkeypatch.setenv("TERM", "xterm")
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        display = display_for(terminal, VERBOSE, tmp_path)
        assert isinstance(display, LiveDisplay)
        display.started("m/t2/validate")
        RunContext(tmp_path, "m/t2/validate").progress(3, 4)
        time.sleep(3 * LiveDisplay.POLL_S)  # the poller draws it, in time with the live refresh
        display.finished("m/t2/validate", "input changed")
        display.close()
        shown = b""
        while True:  # everything written so far (the pty buffers it; nothing reads it meanwhile)
            if not select.select([master], [], [], 0.5)[0]:
                break
            shown += os.read(master, 65536)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", shown.decode(errors="replace"))  # colours and cursor moves
    assert "3/4 batches" in text and "✓ m/t2/validate" in text and "(input changed)" in text
    assert not (tmp_path / "build/.kiln/progress/m__t2__validate.txt").exists()  # a finished step leaves no progress behind
