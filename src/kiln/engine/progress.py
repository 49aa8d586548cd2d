"""What a build shows while it runs. The reporter (kiln.engine.reporter) tells a Display when a step
starts, finishes, fails or is up to date; the Display decides what the user sees:

- in a terminal (LiveDisplay, rich): one live line per running step with a spinner, its elapsed
  time and, for steps that report batches (RunContext.progress), a bar; a line per finished step
  stays above them;
- elsewhere (PlainDisplay: CI logs, a test's subprocess): one plain line per finished step with its
  time, `.  build:<step>  4.2 s` (doit's own mark for a task that ran, and its task name), and
  `-- build:<step>` for one up to date.

Verbosity: QUIET shows only failures (and the summary the reporter prints), VERBOSE adds each step's
why. Rules report batches through RunContext.progress, which writes a small file per step
(kiln.rules.progress_path): steps run in doit's worker processes (-n) or threads (-P thread) alike,
and the live display polls those files.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from pathlib import Path
from typing import TextIO

from kiln.engine.summary import is_terminal, plain_table, rich_table
from kiln.errors import UsageError

QUIET, NORMAL, VERBOSE = 0, 1, 2
_LEVELS = {"quiet": QUIET, "q": QUIET, "0": QUIET, "normal": NORMAL, "1": NORMAL, "": NORMAL, "verbose": VERBOSE, "v": VERBOSE, "2": VERBOSE}


def parse_verbosity(value: str | None) -> int:
    """`doit build verbosity=quiet|normal|verbose` (or 0/1/2); None is normal."""
    text = (value or "").strip().lower()
    if text not in _LEVELS:
        raise UsageError("verbosity", f"{value!r} is not a verbosity; use quiet, normal or verbose (0, 1, 2)")
    return _LEVELS[text]


def read_progress(root: Path, step: str) -> tuple[int, int | None] | None:
    """(done, total) that the step last reported, or None before its first report."""
    from kiln.rules import progress_path  # the rules' module (pydantic): only once steps run

    try:
        done, _, total = progress_path(root, step).read_text().strip().partition(" ")
        return int(done), int(total) if total else None
    except (OSError, ValueError):
        return None


def forget_progress(root: Path, step: str) -> None:
    from kiln.rules import progress_path

    with contextlib.suppress(OSError):
        progress_path(root, step).unlink()


class PlainDisplay:
    """One line per finished step, written to `stream` (see the module's doc)."""

    def __init__(self, stream: TextIO, verbosity: int = NORMAL, root: Path | None = None):
        self.stream, self.verbosity, self.root = stream, verbosity, root
        self.started_at: dict[str, float] = {}

    def started(self, step: str) -> None:
        self.started_at[step] = time.monotonic()
        if self.root is not None:
            forget_progress(self.root, step)  # what an earlier run of it left

    def elapsed(self, step: str) -> float:
        return time.monotonic() - self.started_at.pop(step, time.monotonic())

    def finished(self, step: str, why: str | None) -> None:
        seconds = self.elapsed(step)
        self._ended(step)
        if self.verbosity >= NORMAL:
            self.write(f".  build:{step}  {seconds:.1f} s" + (f"  ({why})" if why and self.verbosity >= VERBOSE else ""))

    def up_to_date(self, step: str) -> None:
        if self.verbosity >= NORMAL:
            self.write(f"-- build:{step}")

    def failed(self, step: str, line: str) -> None:
        self.started_at.pop(step, None)
        self._ended(step)
        self.write(line)

    def write(self, line: str) -> None:
        """A line of kiln's own (a failure, the summary), between the step lines."""
        self.stream.write(line + "\n")
        self.stream.flush()

    def table(self, model: str, rows: list[dict[str, str]]) -> None:
        if rows:
            self.write(plain_table(rows, model))

    def close(self) -> None:
        pass

    def _ended(self, step: str) -> None:
        if self.root is not None:
            forget_progress(self.root, step)


class LiveDisplay(PlainDisplay):
    """rich in a terminal: running steps live at the bottom, finished ones printed above them.

    It writes to its own duplicate of the terminal's descriptor: while a step runs in this process's
    main thread, kiln.execute.step points descriptors 1 and 2 at the step's log, and the live lines
    must keep going to the terminal (and never into that log)."""

    POLL_S = 0.2

    def __init__(self, stream: TextIO, verbosity: int = NORMAL, root: Path | None = None):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        super().__init__(stream, verbosity, root)
        stream.flush()
        self.terminal = os.fdopen(os.dup(stream.fileno()), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8")
        self.console = Console(file=self.terminal, force_terminal=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                                 TextColumn("{task.fields[count]}"), TimeElapsedColumn(), console=self.console, transient=True,
                                 redirect_stdout=False, redirect_stderr=False)  # kiln.execute.step routes those
        self.tasks: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.progress.start()
        self.poller = threading.Thread(target=self._poll, name="kiln-progress", daemon=True)
        self.poller.start()

    def started(self, step: str) -> None:
        super().started(step)
        with self.lock:
            self.tasks[step] = self.progress.add_task(step, total=None, count="")

    def finished(self, step: str, why: str | None) -> None:
        seconds = self.elapsed(step)
        self._remove(step)
        if self.verbosity >= NORMAL:
            because = f"  [dim]({_escape(why)})[/]" if why and self.verbosity >= VERBOSE else ""
            self.console.print(f"[green]✓[/] {_escape(step)}  [dim]{seconds:.1f} s[/]{because}", highlight=False)

    def up_to_date(self, step: str) -> None:
        if self.verbosity >= VERBOSE:  # a no-op build of bert would be 25 lines of nothing happening
            self.console.print(f"[dim]· {_escape(step)} up to date[/]", highlight=False)

    def failed(self, step: str, line: str) -> None:
        self.started_at.pop(step, None)
        self._remove(step)
        self.console.print(f"[bold red]✗[/] {_escape(line)}", highlight=False)

    def write(self, line: str) -> None:
        self.console.print(line, highlight=False, markup=False)

    def table(self, model: str, rows: list[dict[str, str]]) -> None:
        if rows:
            self.console.print(rich_table(model, rows))

    def close(self) -> None:
        self.stop.set()
        self.poller.join()
        self.progress.stop()
        self.terminal.flush()

    def _remove(self, step: str) -> None:
        with self.lock:
            task = self.tasks.pop(step, None)
            if task is not None:
                self.progress.remove_task(task)
        self._ended(step)

    def _poll(self) -> None:
        """Every POLL_S: each running step's last reported batches onto its line."""
        while not self.stop.wait(self.POLL_S):
            with self.lock:
                running = dict(self.tasks)
            for step, task in running.items():
                done = read_progress(self.root, step) if self.root is not None else None
                if done is None:
                    continue
                count, total = done
                with self.lock:
                    if step in self.tasks:
                        self.progress.update(task, completed=count, total=total,
                                             count=f"{count}/{total} batches" if total else f"{count} batches")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def display_for(stream: TextIO, verbosity: int, root: Path | None) -> PlainDisplay:
    """LiveDisplay in a terminal (unless quiet: nothing would be live), else PlainDisplay."""
    if verbosity > QUIET and is_terminal(stream) and os.environ.get("TERM") != "dumb":
        return LiveDisplay(stream, verbosity, root)
    return PlainDisplay(stream, verbosity, root)


def terminal(stream: TextIO) -> TextIO:
    """A stream writing where `stream` writes, through a duplicate of its descriptor: kiln's own
    output to the terminal stays there while the steps' native output is captured (kiln.execute.step._NativeCapture).
    `stream` itself when it has no descriptor."""
    try:
        fd = os.dup(stream.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return stream
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=True), encoding=getattr(stream, "encoding", None) or "utf-8",
                            errors="backslashreplace", line_buffering=True, write_through=True)
