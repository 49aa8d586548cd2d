"""Temp-file names and the sweep of what killed builds left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from kiln.base.temps import sweep_stale_temps, temp_path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_names_hold_the_pid_and_thread_whatever_the_file_is_called(tmp_path: Path):
    assert temp_path(tmp_path / "m001.json").name == f".m001.json.kiln-{os.getpid()}-{threading.get_ident()}.tmp"
    assert temp_path(tmp_path / "model.onnx", "restore").name.endswith(".restore.tmp")


def test_sweep_deletes_dead_writers_temps_and_keeps_live_ones(tmp_path: Path):
    """A live writer in another process or thread (doit -n 2 workers sharing a folder) keeps its
    temp; a dead one's goes. Names with digits, as a 64-bit thread id, must not be taken for a pid."""
    live = temp_path(tmp_path / "m001.2.json")
    live.write_text("being written")
    other_thread = tmp_path / f".m001.json.kiln-{os.getpid()}-{2**63 - 5}.tmp"
    other_thread.write_text("being written")
    dead = tmp_path / f".model.onnx.kiln-{_dead_pid()}-140000000000000.tmp"
    dead.write_text("left by a killed build")
    dead_restore = tmp_path / f".model.onnx.kiln-{_dead_pid()}-1.restore.tmp"
    dead_restore.write_text("left by a killed build")
    not_ours = tmp_path / ".notes.123.tmp"
    not_ours.write_text("someone else's")
    sweep_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_thread.name, not_ours.name])


def test_final_name_is_the_name_a_temp_file_is_renamed_to():
    from kiln.base.temps import final_name, temp_path

    assert final_name(temp_path(Path("/x/model.onnx.data"))) == "model.onnx.data"
    assert final_name(temp_path(Path("/x/model.onnx"), "part")) == "model.onnx"
    assert final_name(Path("/x/model.onnx.data")) == "model.onnx.data"


def test_sweep_deletes_a_dead_writers_temp_folder_and_keeps_a_live_ones(tmp_path: Path):
    """A folder output (model.mlpackage) being written, or an old one set aside while its
    replacement moved in, is a temp folder: a killed build's goes whole, a live writer's stays."""
    (tmp_path / "model.mlpackage").mkdir()  # the replacement is in place: what was set aside is stale
    dead = tmp_path / f".model.mlpackage.kiln-{_dead_pid()}-1.old.tmp"
    (dead / "Data").mkdir(parents=True)
    (dead / "Data" / "weight.bin").write_bytes(b"w")
    dead_output = tmp_path / f".model.mlpackage.kiln-{_dead_pid()}-1.tmp"
    (dead_output / "Data").mkdir(parents=True)
    live = temp_path(tmp_path / "model.mlpackage")
    (live / "Data").mkdir(parents=True)
    sweep_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "model.mlpackage"])
    assert list((tmp_path / "model.mlpackage").iterdir()) == []


def test_sweep_puts_back_an_artifact_a_killed_build_had_set_aside(tmp_path: Path):
    """The crash state of a rename-aside replace_artifact killed between its two renames: the
    destination is absent and the last good build sits under `.old.tmp`. The sweep renames it back
    instead of deleting it; an unfinished new output (no tag) is still deleted."""
    pid = _dead_pid()
    aside = tmp_path / f".model.mlpackage.kiln-{pid}-7.old.tmp"
    (aside / "Data" / "weights").mkdir(parents=True)
    (aside / "Manifest.json").write_bytes(b"last good build")
    unfinished = tmp_path / f".model.mlpackage.kiln-{pid}-7.tmp"
    (unfinished / "Data").mkdir(parents=True)
    aside_file = tmp_path / f".model.onnx.kiln-{pid}-7.old.tmp"
    aside_file.write_bytes(b"onnx")
    sweep_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage", "model.onnx"]
    assert (tmp_path / "model.mlpackage" / "Manifest.json").read_bytes() == b"last good build"
    assert (tmp_path / "model.mlpackage" / "Data" / "weights").is_dir() and (tmp_path / "model.onnx").read_bytes() == b"onnx"


def test_sweep_leaves_a_live_writers_set_aside_artifact_alone(tmp_path: Path):
    """A build still running may be between its two renames: its `.old.tmp` is not touched."""
    aside = temp_path(tmp_path / "model.mlpackage", "old")
    aside.mkdir()
    sweep_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [aside.name]
