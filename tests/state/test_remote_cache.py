"""kiln.state.remote_cache and kiln.state.cache_tiers against a real nginx (tests/nginx_server.py) and,
for a server that dies or stalls mid-transfer, small Python servers that do exactly that.

Covers: a miss runs the step; read-only mode uploads nothing; a step built in one workspace is
restored in another (its own local cache) from the remote, said in its reason, folder outputs
included, and from then on from the local cache; objects go up before the entry and only missing
ones go up; instance prefixes keep caches apart; a corrupted or missing object, or a malformed or
foreign entry, on the server is a miss with a note, never restored, with nothing local changed; a
stopped server, nginx killed mid-upload (no partial object on it) and mid-download, a server that
cuts transfers short and one that never answers give one warning and a local build, with no temp
file left; a kept-alive connection the server closed is reopened without a warning; two builders
uploading the same step at once leave one good entry; a wrong token gives one warning (401) and
the token is never printed; required mode fails the step with one line; and (real doit builds, ~8
s) two workspaces share a whole manifest's build with the token in no file and no output.
Also: a server trickling its answer (headers or a body an entry claims is 1 GiB) is given up on
after about the timeout; Ctrl-C mid-download leaves no file and no half-read connection; a folder
entry whose listing escapes, nests under a file or repeats a path is a miss before anything is
written; an object changed locally uploads no entry; many threads get one warning between them;
an answer that says Connection: close is read whole; a server echoing the Authorization header
or redirecting gets the token printed nowhere."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kiln.execute.step import StepFailed, run_step
from kiln.plan.steps import Step, identity
from kiln.rules import Params, Rule, RunContext, register
from kiln.state.records import read_record
from nginx_server import NginxCache, start_nginx

RULE = "test_remote_upper"
TOKEN = "kiln-test-token-7f3a9c0e"  # must never show up in output or in any file kiln writes
RUNS: list[str] = []


class UpperParams(Params):
    pad: int = 0  # extra bytes in the output: big objects for the mid-transfer tests
    folder: bool = False  # also write a folder output (role "tree")


@register
class RemoteUpper(Rule):
    """Writes its input upper-cased (plus `pad` bytes), and with folder=true a folder output too."""

    name: ClassVar[str] = RULE
    version: ClassVar[int] = 1
    tools: ClassVar[tuple[str, ...]] = ("numpy",)
    Params: ClassVar[type[Params]] = UpperParams
    memory_base_mib: ClassVar[int] = 1
    memory_per_input: ClassVar[float] = 0.0

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: UpperParams, ctx: RunContext) -> dict[str, Any]:
        RUNS.append(ctx.step)
        text = inputs["text"][0].read_text()
        outputs["text"].write_bytes(text.upper().encode() + bytes(range(256)) * (params.pad // 256))
        if params.folder:
            (outputs["tree"] / "sub" / "empty").mkdir(parents=True)
            (outputs["tree"] / "a.txt").write_text(text)
            (outputs["tree"] / "sub" / "b.txt").write_text(text[::-1])
        return {"chars": len(text)}


def make_step(root: Path, text: str = "shared text", source_name: str = "in.txt", **params: Any) -> Step:
    source = root / "src" / source_name
    source.parent.mkdir(parents=True, exist_ok=True)
    before = source.stat().st_mtime_ns if source.exists() else None
    source.write_text(text)
    if before is not None:  # a new mtime, so the digest cache cannot take it for the earlier text
        os.utime(source, ns=(before + 10**9, before + 10**9))
    inputs = {"text": (source,)}
    step_id = f"{RULE}-{identity(RULE, params, inputs, root)[:12]}"
    folder = root / "build" / ".steps" / step_id
    outputs = {"text": folder / "out.txt"} | ({"tree": folder / "tree"} if params.get("folder") else {})
    return Step(id=step_id, rule=RULE, params=params, inputs=inputs, outputs=outputs, model="m", targets=["t"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps_under(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.kiln-*.tmp"))


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("kiln: remote cache")]


@pytest.fixture(autouse=True)
def settings(monkeypatch):
    """Each workspace its own local cache; no remote unless a test names one."""
    for variable in ("KILN_CACHE", "KILN_CACHE_DIR", "KILN_REMOTE_CACHE", "KILN_REMOTE_CACHE_TOKEN", "KILN_REMOTE_CACHE_UPLOAD",
                     "KILN_REMOTE_CACHE_REQUIRED", "KILN_REMOTE_CACHE_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)
    RUNS.clear()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> NginxCache:
    """One nginx for the module; each test uses its own instance prefix on it (remote(...))."""
    nginx = start_nginx(tmp_path_factory.mktemp("nginx"), TOKEN)
    yield nginx
    nginx.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> NginxCache:
    """An nginx of this test's own, to stop or kill."""
    nginx = start_nginx(tmp_path / "nginx", TOKEN)
    yield nginx
    nginx.stop()


def remote(monkeypatch, url: str, upload: bool = False, token: str | None = TOKEN, **extra: str) -> None:
    monkeypatch.setenv("KILN_REMOTE_CACHE", url)
    monkeypatch.setenv("KILN_REMOTE_CACHE_UPLOAD", "1" if upload else "0")
    if token is not None:
        monkeypatch.setenv("KILN_REMOTE_CACHE_TOKEN", token)
    else:
        monkeypatch.delenv("KILN_REMOTE_CACHE_TOKEN", raising=False)
    for variable, value in extra.items():
        monkeypatch.setenv(variable, value)


def instance(server: NginxCache, request) -> tuple[str, Path]:
    """A URL with an instance prefix of this test's own, and where the server keeps its files."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[-60:]
    return f"{server.url}/{name}", server.files / name


def build_in_a(tmp_path: Path, monkeypatch, url: str, **params: Any) -> Step:
    """Workspace A builds the step with uploads on."""
    remote(monkeypatch, url, upload=True)
    step = make_step(tmp_path / "a", **params)
    assert not isinstance(run_step(step, tmp_path / "a"), StepFailed)
    return step


# ---- misses, round trips, modes ------------------------------------------------------------------------

def test_a_miss_runs_the_step_and_read_only_mode_uploads_nothing(tmp_path: Path, monkeypatch, server, request, capfd):
    url, files = instance(server, request)
    remote(monkeypatch, url, upload=False)
    step = make_step(tmp_path / "a")
    run_step(step, tmp_path / "a")
    assert RUNS == [step.name] and step.outputs["text"].read_bytes() == b"SHARED TEXT"
    assert not files.exists()  # read-only: nothing went up
    assert "restored" not in read_record(tmp_path / "a", step).reason
    assert warnings_in(capfd.readouterr().err) == []


def test_a_step_built_in_one_workspace_is_restored_in_another(tmp_path: Path, monkeypatch, server, request, capfd):
    url, files = instance(server, request)
    built = build_in_a(tmp_path, monkeypatch, url, folder=True)
    key = read_record(tmp_path / "a", built).key
    entry = json.loads((files / "ac" / key).read_text())
    assert entry["kiln"] == 1 and entry["key"] == key and set(entry["outputs"]) == {"text", "tree"}
    assert {p.name for p in (files / "cas").iterdir()} == {sha256(p) for p in [built.outputs["text"], *(f for f in built.outputs["tree"].rglob("*") if f.is_file())]}

    remote(monkeypatch, url, upload=False)
    step = make_step(tmp_path / "b", folder=True)
    run_step(step, tmp_path / "b")
    assert RUNS == [built.name]  # B did not run the rule
    record = read_record(tmp_path / "b", step)
    assert record.reason.endswith("restored from the remote cache") and record.data["restored"] is True
    assert record.key == key and record.info == {"chars": 11}
    assert sha256(step.outputs["text"]) == sha256(built.outputs["text"])
    assert sorted(str(p.relative_to(step.outputs["tree"])) for p in step.outputs["tree"].rglob("*")) == ["a.txt", "sub", "sub/b.txt", "sub/empty"]
    assert (step.outputs["tree"] / "sub" / "b.txt").read_text() == "txet derahs"
    assert (tmp_path / "b" / ".kiln" / "cache" / "keys" / key[:2] / f"{key}.json").exists()  # now in B's local cache too
    assert temps_under(tmp_path / "b") == [] and warnings_in(capfd.readouterr().err) == []

    import shutil

    shutil.rmtree(tmp_path / "b" / "build")
    server_files = server.stored()
    run_step(make_step(tmp_path / "b", folder=True), tmp_path / "b")
    assert read_record(tmp_path / "b", step).reason.endswith("restored from the cache")  # the local tier first
    assert server.stored() == server_files and RUNS == [built.name]


def test_only_missing_objects_go_up_and_the_entry_last(tmp_path: Path, monkeypatch, server, request):
    url, files = instance(server, request)
    build_in_a(tmp_path, monkeypatch, url)
    cas = {p.name: p.stat().st_mtime_ns for p in (files / "cas").iterdir()}
    ac = next((files / "ac").iterdir())
    ac.unlink()  # the entry lost (e.g. evicted), its object still there
    import shutil

    shutil.rmtree(tmp_path / "a" / "build")
    shutil.rmtree(tmp_path / "a" / ".kiln")
    build_in_a(tmp_path, monkeypatch, url)
    assert ac.exists() and {p.name: p.stat().st_mtime_ns for p in (files / "cas").iterdir()} == cas  # object not sent again


def test_a_local_hit_fills_a_remote_that_lacks_the_entry(tmp_path: Path, monkeypatch, server, request):
    url, files = instance(server, request)
    step = make_step(tmp_path / "a")
    run_step(step, tmp_path / "a")  # no remote yet: only the local cache has it
    import shutil

    shutil.rmtree(tmp_path / "a" / "build")
    remote(monkeypatch, url, upload=True)
    run_step(make_step(tmp_path / "a"), tmp_path / "a")
    assert RUNS == [step.name] and len(list((files / "ac").iterdir())) == 1


def test_instance_prefixes_keep_caches_apart(tmp_path: Path, monkeypatch, server, request):
    url, _ = instance(server, request)
    build_in_a(tmp_path, monkeypatch, url + "-team-a")
    remote(monkeypatch, url + "-team-b")
    run_step(make_step(tmp_path / "b"), tmp_path / "b")
    assert len(RUNS) == 2


def test_two_builders_uploading_the_same_step_at_once_leave_a_good_entry(tmp_path: Path, monkeypatch, server, request):
    from conftest import run_in_threads

    url, files = instance(server, request)
    remote(monkeypatch, url, upload=True)
    steps = {name: make_step(tmp_path / name, pad=1 << 20) for name in ("a", "b")}
    results = run_in_threads({name: (lambda n=name: run_step(steps[n], tmp_path / n)) for name in steps}, copies=1)
    ran = len(RUNS)  # 2, or 1 when one builder finished before the other looked (then it restored)
    assert ran in (1, 2) and not any(isinstance(result, StepFailed) for _, result in results)
    assert len(list((files / "ac").iterdir())) == 1 and len(list((files / "cas").iterdir())) == 1
    remote(monkeypatch, url)
    step = make_step(tmp_path / "c", pad=1 << 20)
    run_step(step, tmp_path / "c")
    assert len(RUNS) == ran and read_record(tmp_path / "c", step).reason.endswith("restored from the remote cache")
    assert sha256(step.outputs["text"]) == sha256(steps["a"].outputs["text"])


# ---- what the server holds is not trusted ---------------------------------------------------------------

@pytest.mark.parametrize("damage", ["same size", "other size", "missing"])
def test_a_bad_or_missing_object_on_the_server_is_a_miss(tmp_path: Path, monkeypatch, server, request, capfd, damage: str):
    url, files = instance(server, request)
    built = build_in_a(tmp_path, monkeypatch, url)
    (obj,) = (files / "cas").iterdir()
    good = obj.read_bytes()
    if damage == "missing":
        obj.unlink()  # AC present, CAS evicted (Bazel #12423)
    else:
        obj.write_bytes(good.lower() if damage == "same size" else good + b"!")
    remote(monkeypatch, url)
    step = make_step(tmp_path / "b")
    run_step(step, tmp_path / "b")
    assert RUNS == [built.name, step.name]  # B built it itself
    assert step.outputs["text"].read_bytes() == b"SHARED TEXT"
    assert "restored" not in read_record(tmp_path / "b", step).reason
    objects = tmp_path / "b" / ".kiln" / "cache" / "objects"
    assert [p.name for p in objects.rglob("*") if p.is_file()] == [obj.name]  # only B's own, good object
    assert sha256(next(p for p in objects.rglob("*") if p.is_file())) == obj.name
    assert temps_under(tmp_path / "b") == []
    (line,) = warnings_in(capfd.readouterr().err)
    assert f"object {obj.name[:16]}" in line and "is not used" in line and TOKEN not in line


@pytest.mark.parametrize("entry", [
    b"not json at all",
    b'{"kiln": 1, "key": "KEY", "outputs": {"text": {"name": "out.txt", "sha256": "../../../../escape", "bytes": 3}}, "info": {}}',
    b'{"kiln": 1, "key": "0000000000000000000000000000000000000000000000000000000000000000", "outputs": {}, "info": {}}',
])
def test_a_malformed_entry_is_a_miss_and_writes_nothing(tmp_path: Path, monkeypatch, server, request, capfd, entry: bytes):
    url, files = instance(server, request)
    build_in_a(tmp_path, monkeypatch, url)
    (ac,) = (files / "ac").iterdir()
    ac.write_bytes(entry.replace(b"KEY", ac.name.encode()))
    remote(monkeypatch, url)
    step = make_step(tmp_path / "b")
    run_step(step, tmp_path / "b")
    assert len(RUNS) == 2 and step.outputs["text"].read_bytes() == b"SHARED TEXT"
    assert not (tmp_path / "escape").exists() and temps_under(tmp_path / "b") == []
    (line,) = warnings_in(capfd.readouterr().err)
    assert "is ignored" in line


def test_an_entry_of_another_kiln_format_is_a_quiet_miss(tmp_path: Path, monkeypatch, server, request, capfd):
    url, files = instance(server, request)
    build_in_a(tmp_path, monkeypatch, url)
    (ac,) = (files / "ac").iterdir()
    ac.write_text(json.dumps(json.loads(ac.read_text()) | {"kiln": 999}))
    remote(monkeypatch, url)
    run_step(make_step(tmp_path / "b"), tmp_path / "b")
    assert len(RUNS) == 2 and warnings_in(capfd.readouterr().err) == []


# ---- a server that is down, dies or stalls ---------------------------------------------------------------

def test_a_stopped_server_warns_once_and_every_step_builds_locally(tmp_path: Path, monkeypatch, own_server, capfd):
    url = own_server.url + "/team"
    own_server.stop()
    remote(monkeypatch, url, upload=True)
    for i in range(3):
        assert not isinstance(run_step(make_step(tmp_path / "b", text=f"text {i}"), tmp_path / "b"), StepFailed)
    assert len(RUNS) == 3
    (line,) = warnings_in(capfd.readouterr().err)
    assert line.startswith(f"kiln: remote cache {url} unreachable (ConnectionRefusedError") and line.endswith("; building locally")


def test_steps_in_many_threads_get_one_warning_between_them(tmp_path: Path, monkeypatch, own_server, capfd):
    from conftest import run_in_threads

    url = own_server.url + "/team"
    own_server.stop()
    remote(monkeypatch, url, upload=True)
    steps = {f"s{i}": make_step(tmp_path / "a", text=f"text {i}", source_name=f"in{i}.txt") for i in range(8)}  # one build, doit -P thread
    results = run_in_threads({name: (lambda n=name: run_step(steps[n], tmp_path / "a")) for name in steps}, copies=1)
    assert len(RUNS) == 8 and not any(isinstance(result, StepFailed) for _, result in results)
    assert len(warnings_in(capfd.readouterr().err)) == 1


def test_a_server_killed_between_steps_warns_once(tmp_path: Path, monkeypatch, own_server, capfd):
    url = own_server.url + "/team"
    build_in_a(tmp_path, monkeypatch, url)
    own_server.kill()
    run_step(make_step(tmp_path / "a", text="other text"), tmp_path / "a")
    run_step(make_step(tmp_path / "a", text="third text"), tmp_path / "a")
    assert len(RUNS) == 3
    assert len(warnings_in(capfd.readouterr().err)) == 1


def _kill_when(nginx: NginxCache, appears: Callable[[], bool]) -> threading.Thread:
    """Kill nginx (SIGKILL, by PID) the moment `appears()` is true: a transfer is under way."""
    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not appears():
            time.sleep(0.001)
        nginx.kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_nginx_killed_mid_upload_leaves_no_object_and_the_step_succeeds(tmp_path: Path, monkeypatch, own_server, capfd):
    remote(monkeypatch, own_server.url + "/team", upload=True)
    body_temps = own_server.folder / "tmp" / "body"
    watcher = _kill_when(own_server, lambda: body_temps.exists() and any(body_temps.rglob("*")))  # nginx spools the PUT body there
    step = make_step(tmp_path / "a", pad=48 << 20)
    assert not isinstance(run_step(step, tmp_path / "a"), StepFailed)
    watcher.join()
    assert len(RUNS) == 1 and read_record(tmp_path / "a", step) is not None
    assert not (own_server.files / "team" / "cas").exists() or not any((own_server.files / "team" / "cas").iterdir())  # no partial object
    assert not (own_server.files / "team" / "ac").exists()  # and no entry naming it
    assert temps_under(tmp_path / "a") == []
    (line,) = warnings_in(capfd.readouterr().err)
    assert line.startswith(f"kiln: remote cache {own_server.url}/team unreachable (")


def test_nginx_killed_mid_download_leaves_nothing_behind(tmp_path: Path, monkeypatch, capfd):
    nginx = start_nginx(tmp_path / "nginx", TOKEN, limit_rate="8m")  # 16 MiB take 2 s: time to kill it half way
    try:
        built = build_in_a(tmp_path, monkeypatch, nginx.url + "/team", pad=16 << 20)
        remote(monkeypatch, nginx.url + "/team")
        objects = tmp_path / "b" / ".kiln" / "cache" / "objects"
        watcher = _kill_when(nginx, lambda: any(p.stat().st_size > 0 for p in objects.rglob(".*.tmp")) if objects.exists() else False)
        step = make_step(tmp_path / "b", pad=16 << 20)
        assert not isinstance(run_step(step, tmp_path / "b"), StepFailed)
        watcher.join()
    finally:
        nginx.stop()
    assert RUNS == [built.name, step.name] and sha256(step.outputs["text"]) == sha256(built.outputs["text"])
    assert [p.name for p in (tmp_path / "b" / ".kiln" / "cache" / "keys").rglob("*.json")] == [f"{read_record(tmp_path / 'b', step).key}.json"]
    assert temps_under(tmp_path / "b") == []
    (line,) = warnings_in(capfd.readouterr().err)
    assert line.startswith(f"kiln: remote cache {nginx.url}/team unreachable (the connection closed after ")


class _Dying(BaseHTTPRequestHandler):
    """Answers like the cache at `files` would, but cuts every object download (and upload) half way."""

    files: ClassVar[Path]
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.files / self.path.lstrip("/")
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if "/cas/" in self.path:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the server dies mid-download
            self.close_connection = True
        else:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:
        self.rfile.read(min(int(self.headers["Content-Length"]), 1 << 16))
        self.connection.shutdown(socket.SHUT_RDWR)  # the server dies mid-upload, before any answer
        self.close_connection = True


class _Forgetful(_Dying):
    """Serves every GET whole, then closes the connection without saying so (no Connection: close):
    as a server does with a kept-alive connection that sat idle past its keepalive timeout."""

    says_so = False

    def do_GET(self) -> None:
        path = self.files / self.path.lstrip("/")
        data = path.read_bytes() if path.is_file() else b""
        self.send_response(200 if path.is_file() else 404)
        self.send_header("Content-Length", str(len(data)))
        if self.says_so:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True


class _Closing(_Forgetful):
    """Says `Connection: close` with every answer (http.client then hands the socket to the answer)."""

    says_so = True


def _serve(handler: type, files: Path):
    files.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (handler,), {"files": files}))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd


@pytest.fixture
def dying_server(tmp_path: Path):
    httpd = _serve(_Dying, tmp_path / "dying")
    yield httpd, tmp_path / "dying"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(params=[_Forgetful, _Closing])
def forgetful_server(tmp_path: Path, request):
    httpd = _serve(request.param, tmp_path / "forgetful")
    yield httpd, tmp_path / "forgetful"
    httpd.shutdown()
    httpd.server_close()


def test_a_kept_alive_connection_the_server_closed_is_reopened(tmp_path: Path, monkeypatch, server, request, forgetful_server, capfd):
    url, files = instance(server, request)
    built = build_in_a(tmp_path, monkeypatch, url, pad=1 << 20)  # more than a buffer's worth of body after the headers
    import shutil

    httpd, forgetful_files = forgetful_server
    shutil.copytree(files, forgetful_files / "team")
    remote(monkeypatch, f"http://127.0.0.1:{httpd.server_address[1]}/team")
    step = make_step(tmp_path / "b", pad=1 << 20)
    run_step(step, tmp_path / "b")  # GET /ac/ on a new connection, GET /cas/ on the one the server closed
    assert RUNS == [built.name] and read_record(tmp_path / "b", step).reason.endswith("restored from the remote cache")
    assert warnings_in(capfd.readouterr().err) == []


def test_a_server_dying_mid_download_leaves_nothing_behind(tmp_path: Path, monkeypatch, server, request, dying_server, capfd):
    url, files = instance(server, request)
    built = build_in_a(tmp_path, monkeypatch, url, pad=3 << 20)  # a 3 MiB object: several reads
    import shutil

    httpd, dying_files = dying_server
    shutil.copytree(files, dying_files / "team")  # the same entry and object, served by a dying server
    dying_url = f"http://127.0.0.1:{httpd.server_address[1]}/team"
    remote(monkeypatch, dying_url)
    step = make_step(tmp_path / "b", pad=3 << 20)
    assert not isinstance(run_step(step, tmp_path / "b"), StepFailed)
    assert RUNS == [built.name, step.name] and sha256(step.outputs["text"]) == sha256(built.outputs["text"])
    cache = tmp_path / "b" / ".kiln" / "cache"
    assert [p.name for p in (cache / "keys").rglob("*.json")] == [f"{read_record(tmp_path / 'b', step).key}.json"]  # B's own entry
    assert temps_under(tmp_path / "b") == []
    (line,) = warnings_in(capfd.readouterr().err)
    assert line.startswith(f"kiln: remote cache {dying_url} unreachable (") and "closed after 1572869 of 3145739 bytes" in line


def test_a_server_dying_mid_upload_warns_once_and_the_step_succeeds(tmp_path: Path, monkeypatch, dying_server, capfd):
    httpd, _ = dying_server
    url = f"http://127.0.0.1:{httpd.server_address[1]}/team"
    remote(monkeypatch, url, upload=True)
    for i in range(2):
        step = make_step(tmp_path / "a", text=f"text {i}", pad=2 << 20)
        assert not isinstance(run_step(step, tmp_path / "a"), StepFailed)
        assert read_record(tmp_path / "a", step) is not None
    assert len(RUNS) == 2 and temps_under(tmp_path / "a") == []
    (line,) = warnings_in(capfd.readouterr().err)
    assert f"kiln: remote cache {url} unreachable (" in line


@pytest.fixture
def silent_server():
    """Accepts connections and never answers (a hung cache host)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_a_server_that_never_answers_times_out_once(tmp_path: Path, monkeypatch, silent_server, capfd):
    remote(monkeypatch, silent_server, KILN_REMOTE_CACHE_TIMEOUT="0.5")
    for i in range(2):
        run_step(make_step(tmp_path / "b", text=f"text {i}"), tmp_path / "b")
    assert len(RUNS) == 2
    (line,) = warnings_in(capfd.readouterr().err)
    assert line == f"kiln: remote cache {silent_server} unreachable (no answer within 0.5 s); building locally"


@pytest.fixture
def trickling_server():
    """Answers every request one byte at a time, 20 a second (a slowloris-style cache host): the
    status line and headers themselves when `what` is "headers", else a 1 GiB object's body."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop, what = threading.Event(), {"part": "headers"}

    def trickle(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30)
            data = head[:-2] + b"X-Pad: %s\r\n\r\n" % (b"x" * 200) if what["part"] == "headers" else b"x" * 200  # 10 s of it
            if what["part"] != "headers":
                conn.sendall(head)
            for i in range(len(data)):
                if stop.wait(0.05):
                    return
                try:
                    conn.send(data[i:i + 1])
                except OSError:
                    return

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                threading.Thread(target=trickle, args=(listener.accept()[0],), daemon=True).start()
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", what
    stop.set()
    thread.join()
    listener.close()


def test_a_server_that_trickles_its_answer_is_given_up_on_in_time(tmp_path: Path, monkeypatch, trickling_server, capfd):
    url, _ = trickling_server
    remote(monkeypatch, url, KILN_REMOTE_CACHE_TIMEOUT="0.5")
    started = time.monotonic()
    run_step(make_step(tmp_path / "b"), tmp_path / "b")  # the entry's status line comes a byte at a time
    assert time.monotonic() - started < 5 and len(RUNS) == 1
    (line,) = warnings_in(capfd.readouterr().err)
    assert line.startswith(f"kiln: remote cache {url} unreachable (too slow: ")


def test_a_trickled_object_is_given_up_on_in_time_whatever_size_the_entry_claims(tmp_path: Path, trickling_server):
    from kiln.state.remote_cache import RemoteCache, RemoteUnavailable
    from kiln.state.remote_config import RemoteConfig

    url, what = trickling_server
    what["part"] = "body"
    client = RemoteCache(RemoteConfig(url=url, timeout=0.5))
    started = time.monotonic()
    with pytest.raises(RemoteUnavailable, match=r"^too slow: "):
        client.fetch_object("ab" * 32, 1 << 30, tmp_path / "object.tmp")  # a 1 GiB object: no 17-minute allowance
    assert time.monotonic() - started < 5 and not (tmp_path / "object.tmp").exists()


def test_an_interrupted_download_leaves_no_file_and_no_half_read_connection(tmp_path: Path, monkeypatch, server, request):
    from kiln.state.cache_tiers import tiers_for

    url, _ = instance(server, request)
    built = build_in_a(tmp_path, monkeypatch, url, pad=3 << 20)
    entry = json.loads(next((server.files / url.rsplit("/", 1)[1] / "ac").iterdir()).read_text())
    sha, size = entry["outputs"]["text"]["sha256"], entry["outputs"]["text"]["bytes"]
    remote(monkeypatch, url)
    tiers = tiers_for(tmp_path / "b")

    def interrupt(self, **moved: int) -> None:
        raise KeyboardInterrupt

    counting = type(tiers.remote)._count
    monkeypatch.setattr(type(tiers.remote), "_count", interrupt)  # Ctrl-C after the first chunk was written
    with pytest.raises(KeyboardInterrupt):
        tiers._fetch(sha, size)
    assert temps_under(tmp_path / "b") == [] and not tiers.local.has_object(sha)
    assert getattr(tiers.remote._local, "conn", None) is None  # dropped: its unread body must not meet the next request
    monkeypatch.setattr(type(tiers.remote), "_count", counting)  # the next step restores over a fresh connection
    step = make_step(tmp_path / "b", pad=3 << 20)
    run_step(step, tmp_path / "b")
    assert RUNS == [built.name] and read_record(tmp_path / "b", step).reason.endswith("restored from the remote cache")


@pytest.mark.parametrize("listing", ["escaping", "under a file", "twice"])
def test_a_folder_entry_that_would_write_elsewhere_or_fail_half_way_is_a_miss(tmp_path: Path, monkeypatch, server, request, capfd, listing: str):
    from kiln.base.hashing import tree_sha256

    url, files = instance(server, request)
    build_in_a(tmp_path, monkeypatch, url, folder=True)
    (ac,) = (files / "ac").iterdir()
    entry = json.loads(ac.read_text())
    tree = entry["outputs"]["tree"]
    lines = {"escaping": lambda rel: "../../../escape.txt" if rel == "a.txt" else rel,
             "under a file": lambda rel: "a.txt/b.txt" if rel == "sub/b.txt" else rel,
             "twice": lambda rel: "a.txt" if rel == "sub/b.txt" else rel}[listing]
    tree["files"] = [[lines(rel), sha, size] for rel, sha, size in tree["files"]]
    tree["sha256"] = tree_sha256((rel, sha) for rel, sha, _ in tree["files"])  # a poisoner can make it add up
    ac.write_text(json.dumps(entry))
    remote(monkeypatch, url)
    step = make_step(tmp_path / "b", folder=True)
    assert not isinstance(run_step(step, tmp_path / "b"), StepFailed)
    assert len(RUNS) == 2 and (step.outputs["tree"] / "sub" / "b.txt").read_text() == "txet derahs"  # B built it
    assert not list(tmp_path.rglob("escape.txt")) and temps_under(tmp_path / "b") == []
    (kept,) = (tmp_path / "b" / ".kiln" / "cache" / "keys").rglob("*.json")
    assert json.loads(kept.read_text())["outputs"]["tree"]["sha256"] != tree["sha256"]  # B's own entry, not the poisoned one
    (line,) = warnings_in(capfd.readouterr().err)
    assert "is ignored: its output 'tree' is malformed" in line


def test_an_object_that_changed_locally_uploads_no_entry(tmp_path: Path, monkeypatch, server, request, capfd):
    from kiln.state.cache_tiers import tiers_for

    url, files = instance(server, request)
    step = make_step(tmp_path / "a")
    run_step(step, tmp_path / "a")  # no remote yet
    key = read_record(tmp_path / "a", step).key
    remote(monkeypatch, url, upload=True)
    tiers = tiers_for(tmp_path / "a")
    obj = tiers.local.object_path(json.loads(tiers.local.entry_path(key).read_text())["outputs"]["text"]["sha256"])
    obj.unlink()  # a hard link to the output: write other bytes of the same size, as an edit in place would
    obj.write_bytes(b"shared text")
    tiers.share(key, ran=True)
    assert not (files / "ac").exists()
    (line,) = warnings_in(capfd.readouterr().err)
    assert "is not uploaded" in line and "changed while it was uploaded" in line


class _Echoing(_Dying):
    """Refuses everything with the request's Authorization header as its reason phrase."""

    def do_GET(self) -> None:
        self.send_response(500, str(self.headers.get("Authorization")))
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Redirecting(_Dying):
    """Sends every request on to another host, as a misconfigured proxy or an S3 region change would."""

    def do_GET(self) -> None:
        self.send_response(307)
        self.send_header("Location", f"http://localhost:{self.server.server_address[1]}{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.mark.parametrize("handler", [_Echoing, _Redirecting])
def test_a_server_that_echoes_or_redirects_gets_no_token(tmp_path: Path, monkeypatch, capfd, handler: type):
    httpd = _serve(handler, tmp_path / "files")
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        remote(monkeypatch, url)
        run_step(make_step(tmp_path / "b"), tmp_path / "b")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len(RUNS) == 1
    (line,) = warnings_in(capfd.readouterr().err)
    assert TOKEN not in line
    assert ("HTTP 500 Bearer <token> on GET" in line) if handler is _Echoing else ("HTTP 307" in line and "not followed" in line)


# ---- credentials and required mode -----------------------------------------------------------------------

def test_a_wrong_token_gives_one_warning_and_is_never_printed(tmp_path: Path, monkeypatch, server, request, capfd):
    url, files = instance(server, request)
    remote(monkeypatch, url, upload=True, token="wrong-secret-4d1e")
    for i in range(2):
        run_step(make_step(tmp_path / "a", text=f"text {i}"), tmp_path / "a")
    assert len(RUNS) == 2 and not files.exists()
    out, err = capfd.readouterr()
    (line,) = warnings_in(err)
    assert "HTTP 401" in line and "KILN_REMOTE_CACHE_TOKEN" in line
    assert "wrong-secret-4d1e" not in out + err
    assert not any(b"wrong-secret-4d1e" in p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file())


def test_required_mode_fails_the_step_with_one_line(tmp_path: Path, monkeypatch, own_server):
    url = own_server.url
    own_server.stop()
    remote(monkeypatch, url, KILN_REMOTE_CACHE_REQUIRED="1")
    step = make_step(tmp_path / "b")
    failed = run_step(step, tmp_path / "b")
    assert isinstance(failed, StepFailed) and RUNS == []
    assert "\n" not in failed.kiln_line
    assert failed.kiln_line.startswith(f"{step.name}: remote cache {url} unreachable (ConnectionRefusedError")
    assert "KILN_REMOTE_CACHE_REQUIRED=1" in failed.kiln_line
    failed_again = run_step(make_step(tmp_path / "b", text="other"), tmp_path / "b")  # the next step too
    assert isinstance(failed_again, StepFailed) and RUNS == []


def test_a_bad_setting_fails_the_step_naming_it(tmp_path: Path, monkeypatch):
    remote(monkeypatch, "http://127.0.0.1:1", KILN_REMOTE_CACHE_UPLOAD="sometimes")
    failed = run_step(make_step(tmp_path / "b"), tmp_path / "b")
    assert isinstance(failed, StepFailed) and "KILN_REMOTE_CACHE_UPLOAD: 'sometimes' is not allowed; use 0 or 1" in failed.kiln_line


# ---- whole builds: two workspaces, one nginx -------------------------------------------------------------

def test_two_workspaces_share_a_build_and_the_token_is_nowhere(tmp_path: Path, server, request):
    from workspaces import mlp_workspace

    url, files = instance(server, request)
    env = {"KILN_REMOTE_CACHE": url, "KILN_REMOTE_CACHE_TOKEN": TOKEN}
    a, b = mlp_workspace(tmp_path / "a", ("m",)), mlp_workspace(tmp_path / "b", ("m",))
    built = _doit(a.root, env | {"KILN_REMOTE_CACHE_UPLOAD": "1"})
    assert files.exists() and len(list((files / "ac").iterdir())) == len([s for s in a.report("m")["steps"] if s["status"] == "ran"])
    restored = _doit(b.root, env)
    steps = [s for s in b.report("m")["steps"] if s["status"] == "ran"]
    assert steps and all(s["why"].endswith("restored from the remote cache") for s in steps), [s["why"] for s in steps]
    assert b.report("m")["ok"]
    assert sha256(a.root / "build/m/fp32/model.onnx") == sha256(b.root / "build/m/fp32/model.onnx")
    for proc in (built, restored):
        assert TOKEN not in proc.stdout + proc.stderr and warnings_in(proc.stderr) == []
    leaked = [p for ws in (a, b) for p in ws.root.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []


def _doit(root: Path, env: dict[str, str]):
    import subprocess

    clean = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    proc = subprocess.run([sys.executable, "-m", "doit", "build"], check=False, cwd=root, capture_output=True, text=True,
                          env=clean | {"HF_HUB_OFFLINE": "1"} | env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
