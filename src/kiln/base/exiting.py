"""Ending a process that has loaded torch, transformers or onnxruntime without paying for the
interpreter's teardown.

Once a build has written everything, Python's finalization still frees every module and object one
by one: about 1.2 s with torch and transformers loaded (measured on the 2-core machine: a cold
`kiln build` of bert's onnx_fp32 spent 1.33 s between its last line and its exit, 0.12 s with this),
paid again by every export child. The registered exit handlers (logging's flush, temporary folders'
finalizers) still run, and the streams are flushed; only the freeing is skipped. When a non-daemon
thread is still running, the ordinary exit runs instead: Python would wait for that thread, and so
must we."""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_without_teardown(code: int | None) -> None:
    """Exit with `code` now (None is 0, as for sys.exit): exit handlers run, stdout and stderr are
    flushed, then os._exit."""
    code = 0 if code is None else code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`kiln explain | head`) or a closed stream
            pass
    os._exit(code)
