"""kiln.base.exiting: a process ends without Python's teardown, but with everything it wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_exit_code_buffered_output_and_exit_handlers_survive():
    proc = _run(
        "import atexit, sys\n"
        "from kiln.base.exiting import exit_without_teardown\n"
        "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
        "print('x' * 200000, end='')\n"  # more than a pipe's buffer: it must be flushed, not dropped
        "exit_without_teardown(3)\n"
    )
    assert proc.returncode == 3
    assert proc.stdout == "x" * 200000
    assert "handler ran" in proc.stderr


def test_none_is_success_as_for_sys_exit():
    assert _run("from kiln.base.exiting import exit_without_teardown; exit_without_teardown(None)").returncode == 0


def test_a_running_non_daemon_thread_is_waited_for(tmp_path: Path):
    done = tmp_path / "done"
    proc = _run(
        "import threading, time\n"
        "from kiln.base.exiting import exit_without_teardown\n"
        f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(done)!r}, 'w').write('ok'))).start()\n"
        "exit_without_teardown(0)\n"
    )
    assert proc.returncode == 0 and done.read_text() == "ok"  # os._exit would have killed the thread first


def test_the_kiln_command_exits_with_mains_code(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "--root", str(tmp_path), "check", "missing"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("kiln: error:")
