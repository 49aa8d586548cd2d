"""Running one step (ninja's Builder): restore its outputs from the cache when its key is there, else
run its rule into temp files and rename them into place; then write the record. Called by doit,
one task per step (kiln.engine.tasks).

An output is whatever the rule leaves at the temp path it was given: a file, or a folder (Core ML's
model.mlpackage, a TensorFlow SavedModel), which is moved into place whole (kiln.base.fsio.
replace_artifact) and recorded by its tree digest and bytes with its files listed (kiln.base.hashing)."""

from __future__ import annotations

import codecs
import contextlib
import functools
import importlib
import io
import itertools
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from doit.exceptions import TaskFailed

from kiln.base.digests import digest, listing, remember, remember_listing
from kiln.base.fsio import artifact_bytes, remove_artifact, replace_artifact, write_json_atomic
from kiln.base.hashing import UnsafeFolderEntry, list_tree, tree_sha256
from kiln.base.paths import relative
from kiln.base.quiet import running
from kiln.base.temps import sweep_stale_temps, temp_path
from kiln.errors import KilnError, StepError, one_line
from kiln.execute.resources import Meter, metered, remember_usage, reservation_mib, reserve
from kiln.rules import RunContext, get_rule
from kiln.runtime.child import raised_at
from kiln.state.cache_tiers import REMOTE, tiers_for
from kiln.state.records import failure_path, last_path, log_path, write_record
from kiln.state.uptodate import components, reason, step_key

if TYPE_CHECKING:
    from kiln.plan.steps import Step

# Under doit -P thread (kiln's default), torch work in this process runs one step at a time:
# torch.onnx.export flips process-global state (torch.onnx.is_in_onnx_export) that a model running in
# another thread would see, and torch already spreads one step over every core. A rule whose torch
# runs in a child process (Rule.runs_in_child) does not take it; doit's worker processes each have
# their own torch. Waiting torch steps take it in the build's order (set_step_order).
class _TorchLock:
    """The torch lock: the waiting torch step that ranks first in the build's order (set_step_order:
    the longest chain of work after it, kiln.plan.steps.seconds_after) goes next, then the others
    as they came."""

    def __init__(self):
        self._changed = threading.Condition(threading.Lock())
        self._held = False
        self._waiting: list[tuple[int, int]] = []  # (rank, arrival) of the torch steps waiting
        self._arrivals = itertools.count()
        self.ranks: dict[str, int] = {}  # step name -> rank in the build's order (set_step_order)

    def locked(self) -> bool:
        return self._held

    @contextlib.contextmanager
    def turn(self, step_name: str = "", first: Callable[[], None] = lambda: None):
        """Hold the lock once it is this step's turn. `first` runs after the step has joined the
        queue, before it waits: a step still importing its tools keeps its place."""
        me = (self.ranks.get(step_name, len(self.ranks)), next(self._arrivals))
        with self._changed:
            self._waiting.append(me)
        try:
            first()
            with self._changed:
                self._changed.wait_for(lambda: not self._held and me == min(self._waiting))
                self._held = True
        finally:
            with self._changed:
                self._waiting.remove(me)
                self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._held = False
                self._changed.notify_all()


def set_step_order(names: list[str]) -> None:
    """The build's order of steps (best first), which waiting torch steps take the lock in."""
    _torch_lock.ranks = {name: rank for rank, name in enumerate(names)}


_torch_lock = _TorchLock()
# First imports of a step's tools, one step at a time (_tools_ready).
_imports_lock = threading.Lock()


def run_step(step: Step, root: Path, remote: Callable | None = None):
    """doit action: restore the step's outputs from the cache when its key is there, else run the
    rule into temp files and rename them into place; then write the record, with what the run cost
    (kiln.execute.resources.metered). What the rule used sizes its next reservation. `remote` runs
    a step that missed the caches elsewhere instead (kiln.execute.ray_executor.run_remote, given by
    kiln.engine.tasks under `--executor ray`): its outputs come back through the remote cache."""
    started = time.monotonic()
    with metered() as meter, running(root):  # running: latency probes know this step shares the cores (kiln.base.quiet)
        result = _run(step, root, started, meter, remote)
    remember_usage(root, step, meter.finish())
    return result


def _run(step: Step, root: Path, started: float, meter: Meter, remote: Callable | None):
    sweep_stale_temps(log_path(root, step).parent)  # a killed run's log, even when this run restores from the cache
    try:
        current = components(step, root)
    except UnsafeFolderEntry as err:  # an input folder holding a symlink: its digest would not say what the rule reads
        return _failed(step, root, "inputs checked", f"{step.name}: input {err.naming(relative(err.folder, root))}", started, meter)
    key = step_key(current)
    why = reason(step, root, current) or "forced (doit -a or an explicit request)"
    try:  # the local cache, then the remote one (kiln.state.cache_tiers)
        tiers = tiers_for(root)
        hit = tiers.restore(key, step.outputs, step.name) if tiers is not None else None
    except KilnError as err:  # a bad remote cache setting, or a required remote cache that failed
        return _failed(step, root, why, f"{step.name}: {err}", started, meter)
    entry = hit[0] if hit is not None else None
    if hit is not None:
        info, why = entry["info"], f"{why}; restored from the {hit[1]}"
        for role, path in step.outputs.items():  # restore re-hashed every byte it copied: remember that digest, do not read again
            _remember_output(root, path, entry["outputs"][role])
    else:
        if remote is not None:
            info = remote(step, root, key, current, tiers, why, started, meter)
        else:
            info = _execute(step, root, why, started, meter)
        if isinstance(info, TaskFailed):
            return info
    outputs = {role: output_entry(root, p) for role, p in step.outputs.items()}
    if tiers is not None and entry is None:
        tiers.store(key, outputs, root, info)
        for role, path in step.outputs.items():  # a hard link changes the file's ctime: keep its digest fresh
            _remember_output(root, path, outputs[role])
    if tiers is not None and (hit is None or hit[1] != REMOTE):
        try:
            tiers.share(key, ran=entry is None)  # uploads, when they are on
        except KilnError as err:  # a required remote cache that failed
            return _failed(step, root, why, f"{step.name}: {err}", started, meter)
    write_record(root, step, {
        "step": step.name, "id": step.id, "key": key, "components": current, "outputs": outputs,
        "reason": why, "seconds": round(time.monotonic() - started, 3), "info": info, "restored": entry is not None,
        **meter.finish(),
    })
    for model, target in step.owners():
        write_json_atomic(last_path(root, step, target, model), current)
    failure_path(root, step).unlink(missing_ok=True)
    return {"key": key}


def output_entry(root: Path, path: Path) -> dict:
    """What a record holds of one output: workspace-relative path, sha256 and bytes; for a folder,
    its tree digest, the sum of its files' bytes and "files": [[relative path, sha256, bytes], ...],
    empty folders included as [relative path + "/", "dir", 0] (so a change inside it can be named,
    and the cache can store it file by file and make its empty folders again)."""
    if path.is_dir():
        files = listing(root, path)
        return {"path": relative(path, root), "sha256": tree_sha256((rel, sha256) for rel, sha256, _ in files),
                "bytes": sum(size for _, _, size in files), "files": files}
    return {"path": relative(path, root), "sha256": digest(root, path), "bytes": path.stat().st_size}


def _remember_output(root: Path, path: Path, entry: dict) -> None:
    """Tell the digest cache an output's digests, known without reading it (an output_entry or a
    cache entry, which has the same shape)."""
    if "files" in entry:
        remember_listing(root, path, entry["files"])
    else:
        remember(root, path, entry["sha256"])


def _execute(step: Step, root: Path, why: str, started: float, meter: Meter):
    """Run the rule into temp files and rename them into place, with what it prints, logs and warns
    going to the step's log (_captured). Returns the rule's facts, or a StepFailed for any exception
    (recorded in the failure file, the traceback in the log); no temp file survives."""
    rule = get_rule(step.rule)
    params = rule.Params.model_validate(step.params)
    temps = {role: temp_path(path) for role, path in step.outputs.items()}
    for folder in {p.parent for p in temps.values()}:
        sweep_stale_temps(folder)  # what a killed run of this step left behind
    created = [p.parent for p in temps.values() if not p.parent.exists()]
    for folder in created:
        folder.mkdir(parents=True, exist_ok=True)
    log = log_path(root, step)
    _wrap_streams()  # now, not once the locks below are taken: doit -P thread has just put its own sys.stdout in place
    try:
        meter.reserved_mib = reservation_mib(root, step, rule.memory_mib(step.params, _input_bytes(step)))
        with reserve(root, step, meter.reserved_mib), _captured(log, f"{step.name}: {step.rule} v{rule.version}, {why}"), \
                _tools_ready(rule, step.params, step.name):  # inside the capture: what imports print goes to the step's log
            info = rule().run({r: list(f) for r, f in step.inputs.items()}, temps, params, RunContext(root, step.name)) or {}
            missing = [role for role, path in temps.items() if not path.exists()]
            if missing:
                raise RuntimeError(f"rule {step.rule} did not write its output {missing[0]!r}")
            for role, path in temps.items():
                _check_folder(step, role, path)
    except BaseException as err:  # no temp output may stay behind, whatever went wrong
        for path in temps.values():
            remove_artifact(path)
        for folder in created:  # a failed target leaves no empty build/<model>/<target>/ behind
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: the build stops
            raise
        return _failed(step, root, why, f"{step.name}: {_cause(err, step, root)}", started, meter, err.facts if isinstance(err, StepError) else {}, log)
    for role, temp in temps.items():
        replace_artifact(temp, step.outputs[role])
    return info


def _check_folder(step: Step, role: str, temp: Path) -> None:
    """A folder output may hold only regular files and folders: a symlink would make the artifact
    point outside itself (and its bytes depend on what the link reaches)."""
    if not temp.is_dir():
        return
    try:
        list_tree(temp)
    except UnsafeFolderEntry as err:
        raise StepError(step.name, f"output {role!r} ({step.outputs[role].name}) holds {err.relpath}, a {err.kind}: "
                                   "a folder artifact may hold only regular files and folders; write the file itself there") from None


def _failed(step: Step, root: Path, why: str, error: str, started: float, meter: Meter, facts: dict | None = None,
            log: Path | None = None) -> StepFailed:
    """Record a failure (the failure file the report reads, with what the run cost) and return doit's failure for it."""
    logged = {"log": relative(log, root)} if log is not None else {}
    write_json_atomic(failure_path(root, step), {"step": step.name, "reason": why, "error": error, **logged,
                                                 "facts": facts or {}, "seconds": round(time.monotonic() - started, 3), **meter.finish()})
    return StepFailed(f"{error} (log: {logged['log']})" if logged else error)


class StepFailed(TaskFailed):
    """doit's failure for a step: its message is the one line the terminal shows
    (kiln.engine.reporter prints `kiln_line` alone, without doit's traceback and captured output)."""

    def __init__(self, line: str):
        super().__init__(line)
        self.kiln_line = line


def _cause(err: Exception, step: Step, root: Path) -> str:
    """The failure as one line. A StepError is the rule's own words (naming the file or tensor); any
    other exception is its type and message, and where it was raised outside installed libraries
    (the line of the user's factory or of the rule), so a bug is findable from the line alone."""
    if isinstance(err, StepError):
        return one_line(err.problem if err.step == step.name else str(err))
    where = raised_at(err, root)
    return f"{type(err).__name__}: {one_line(err)[:400] or 'no message'}" + (f" (at {where})" if where else "")


# ---- what a rule prints, logs and warns goes to its step's log ----------------------------------
#
# Where a step runs in the process's main thread (doit's default and its -n worker processes, which
# run one task at a time each), nothing else runs steps in this process, so file descriptors 1 and 2
# are pointed at the log for the rule's duration: that catches what C/C++ libraries print (onnxsim,
# onnxruntime, OpenVINO) and Python handlers bound to the original stderr at import (transformers'
# logger). Under doit -P thread (and `kiln build -n N`) several steps share the process and a
# descriptor is process-wide, so redirecting it would mix their logs and hide the build's own output:
# there only Python-level output is captured, routed by thread (sys.stdout/sys.stderr writes,
# warnings, logging records that reach the root logger); what C++ code writes to fd 1/2 stays on the
# terminal. Serialising thread builds to get it too would throw away the parallelism they are for.

_logs: dict[int, TextIO] = {}  # thread ident -> the log of the step that thread runs
_logs_lock = threading.RLock()


class _RoutedStream(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr: a thread running a step writes to its log, any other
    thread where the stream went before. It stays valid after the step (a library may have kept a
    reference to it, as tqdm and logging handlers do)."""

    def __init__(self, fallback):
        super().__init__()
        self.fallback = fallback

    def _target(self):
        return _logs.get(threading.get_ident()) or self.fallback

    def write(self, text: str) -> int:
        self._target().write(text)
        return len(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        target = self._target()
        return target is self.fallback and bool(getattr(target, "isatty", lambda: False)())

    def fileno(self) -> int:
        try:
            return self._target().fileno()
        except AttributeError:  # doit's capturing Writer has none
            raise io.UnsupportedOperation("fileno") from None

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self._target(), "encoding", "utf-8")


class _RoutedRecords(logging.Handler):
    """On the root logger while steps run: a record goes to the log of the step its thread runs."""

    def __init__(self):
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.users = 0

    def emit(self, record: logging.LogRecord) -> None:
        log = _logs.get(record.thread or 0)
        if log is not None:
            log.write(self.format(record) + "\n")


_records = _RoutedRecords()


class _RoutedWarnings:
    """warnings.showwarning while steps run: a warning raised in a thread running a step is written to
    its log, any other goes where it went before (whoever had replaced showwarning keeps it)."""

    def __init__(self):
        self.users = 0
        self.before = None

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        log = _logs.get(threading.get_ident())
        if log is None or file is not None:
            return self.before(message, category, filename, lineno, file, line)
        log.write(warnings.formatwarning(message, category, filename, lineno, line))


_warnings = _RoutedWarnings()


@contextlib.contextmanager
def _captured(log: Path, header: str):
    """Run the body with this thread's output going to `log` (written as a temp file and renamed into
    place when the body ends, however it ends); an exception's traceback is written there too."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(log.parent)
    temp = temp_path(log)
    try:
        with open(temp, "w", encoding="utf-8", errors="backslashreplace", buffering=1) as stream:
            stream.write(header + "\n")
            try:
                with _routed(stream), _descriptors(stream) if threading.current_thread() is threading.main_thread() else _native_to_logs():
                    yield
            except BaseException:
                stream.write("\n" + traceback.format_exc())
                raise
    finally:
        os.replace(temp, log)


@contextlib.contextmanager
def _routed(stream: TextIO):
    """sys.stdout, sys.stderr, warnings and root logging records of this thread -> stream. The
    routing is installed by the first step to start and removed by the last to end, never while
    another thread's step runs (doit -P thread also swaps sys.stdout around each task: whatever it
    put there is wrapped again when a step starts)."""
    me = threading.get_ident()
    with _logs_lock:
        _logs[me] = stream
        if _records.users == 0:
            logging.getLogger().addHandler(_records)
            _warnings.before, warnings.showwarning = warnings.showwarning, _warnings
        _records.users += 1
    _wrap_streams()
    try:
        yield
    finally:
        with _logs_lock:
            _logs.pop(me, None)
            _records.users -= 1
            if _records.users == 0:
                logging.getLogger().removeHandler(_records)
                if warnings.showwarning is _warnings:  # else a rule replaced it since: leave theirs
                    warnings.showwarning = _warnings.before
                sys.stdout, sys.stderr = (s.fallback if isinstance(s, _RoutedStream) else s for s in (sys.stdout, sys.stderr))


def _wrap_streams() -> None:
    """Make sys.stdout and sys.stderr routing streams (kept when they are already)."""
    with _logs_lock:
        sys.stdout, sys.stderr = (s if isinstance(s, _RoutedStream) else _RoutedStream(s) for s in (sys.stdout, sys.stderr))


@contextlib.contextmanager
def _descriptors(stream: TextIO):
    """File descriptors 1 and 2 -> stream's file, then back (only where this thread is the process's
    only step: see above). Buffers are flushed on both sides so nothing lands on the wrong side."""
    try:
        os.fstat(1), os.fstat(2)
    except OSError:  # a process without stdout/stderr descriptors: nothing to redirect
        yield
        return
    saved = [os.dup(1), os.dup(2)]
    _flush_all()
    try:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        yield
    finally:
        _flush_all()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


class _NativeCapture:
    """While steps run in worker threads (doit -P thread, kiln's default), what native code writes
    to file descriptors 1 and 2 (a C library's printf, onnxruntime's std::cerr, a child process that
    inherited them) goes to an unnamed temp file, and from there to the log of the step running
    then, or of every step running then, marked so, when several are: descriptors belong to the
    process, so which thread wrote a chunk cannot be known. Installed by the first step to start,
    removed by the last to end (as _routed); a step that ends copies what was written until then
    (drain). A file, not a pipe: a writer never waits for a reader, so native code that writes while
    holding the GIL or a stdio lock cannot stall the build (a pipe's reader thread needs both).
    kiln's own terminal output (the reporter, the live display) writes to a duplicate of the
    terminal's descriptor (kiln.engine.progress.terminal), which this does not touch; what is
    drained while no step runs goes to the terminal's stderr."""

    PIECE = 1 << 20  # bytes copied at a time

    def __init__(self):
        self.users = 0
        self.saved: list[int] = []
        self.file = -1
        self.offset = 0

    def start(self) -> None:
        import fcntl
        import tempfile

        try:
            os.fstat(1), os.fstat(2)
        except OSError:  # no stdout/stderr descriptors: nothing to capture
            return
        _flush_all()
        try:
            fd, path = tempfile.mkstemp(prefix="kiln-native-")
        except OSError:  # no writable temp folder: native output stays on the terminal, the steps run
            return
        os.unlink(path)  # unnamed: gone with its last descriptor, even after a crash
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)  # writers of 1 and 2 never overwrite each other
        self.saved, self.file, self.offset = [os.dup(1), os.dup(2)], fd, 0
        os.dup2(fd, 1)
        os.dup2(fd, 2)

    def drain(self) -> None:
        """Copy everything written to 1 and 2 before this call to the logs of the steps running."""
        if not self.saved:
            return
        _flush_all()
        with _logs_lock:
            end = os.fstat(self.file).st_size
            logs = list(_logs.values())
            note = "" if len(logs) < 2 else f"[native output while {len(logs)} steps ran; it may be any one's]\n"
            decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
            while self.offset < end:
                chunk = os.pread(self.file, min(self.PIECE, end - self.offset), self.offset)
                if not chunk:
                    break
                self.offset += len(chunk)
                self._route(chunk, decoder.decode(chunk, final=self.offset >= end), logs, note)
                note = ""

    def stop(self) -> None:
        if not self.saved:
            return
        self.drain()
        _flush_all()
        for fd, copy in zip((1, 2), self.saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(self.file)
        self.saved, self.file = [], -1

    def _route(self, chunk: bytes, text: str, logs: list[TextIO], note: str) -> None:
        if not logs:
            with contextlib.suppress(OSError):
                os.write(self.saved[1], chunk)
            return
        for log in logs:
            with contextlib.suppress(ValueError, OSError):  # a log closed meanwhile
                log.write(note + text)


_native = _NativeCapture()


@contextlib.contextmanager
def _native_to_logs():
    with _logs_lock:
        if _native.users == 0:
            _native.start()
        _native.users += 1
    try:
        yield
    finally:
        _native.drain()  # this step's log is still registered: what it wrote lands there
        with _logs_lock:
            _native.users -= 1
            if _native.users == 0:
                _native.stop()


def _flush_all() -> None:
    """Python's own std streams and C's stdio buffers (printf output waits there when fd 1 is not a terminal)."""
    import ctypes

    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _tools_ready(rule, params: dict, step_name: str):
    """Import those of the rule's tools that this process has not imported yet, one step at a time;
    then, for a rule that runs torch in this process, hold the torch lock for the whole run. Two
    threads importing packages for the first time at once can meet half-initialized modules
    (CPython 3.11's per-module import locks: sklearn_iris's convert_sklearn and reference_outputs
    both importing sklearn gave "cannot import name 'clone' from partially initialized module
    'sklearn.base'"); a rule's own imports then find its tools loaded. The imports lock is never
    held while waiting for anything else, so it cannot deadlock with the torch lock."""
    if rule.runs_in_child:  # the parent only writes the job and waits; its tools load in the child
        yield
        return
    tools = tuple(rule.tools_for(params))
    if "torch" in tools:
        with _torch_lock.turn(step_name, first=lambda: _import_missing(tools)):  # in the queue while importing
            yield
    else:
        _import_missing(tools)
        yield


def _import_missing(tools: tuple[str, ...]) -> None:
    missing = [module for module in _modules_of(tools) if module not in sys.modules]
    if not missing:
        return
    with _imports_lock:
        for module in missing:
            if module not in sys.modules:  # another step may have imported it meanwhile
                with contextlib.suppress(Exception):  # a tool that fails to import fails in the rule, with its own error
                    importlib.import_module(module)


def _modules_of(tools: tuple[str, ...]) -> list[str]:
    """The importable top-level modules of these distributions (numpy -> numpy, scikit-learn ->
    sklearn), in the order given; names that are no installed distribution (java, tool
    environments) have none."""
    provided = _modules_by_distribution()
    found: list[str] = []
    for tool in tools:
        modules = provided.get(_normalized(tool), [])
        named = tool.lower().replace("-", "_")
        for module in [named] if named in modules else modules:  # torch, not torchgen and functorch beside it
            if module not in found:
                found.append(module)
    return found


@functools.cache
def _modules_by_distribution() -> dict[str, list[str]]:
    from importlib import metadata

    provided: dict[str, list[str]] = {}
    for module, distributions in metadata.packages_distributions().items():
        if module.isidentifier() and not module.startswith("_"):
            for distribution in distributions:
                provided.setdefault(_normalized(distribution), []).append(module)
    return {name: sorted(modules) for name, modules in provided.items()}


def _normalized(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


def _input_bytes(step: Step) -> int:
    return sum(artifact_bytes(p) for files in step.inputs.values() for p in files if p.exists())
