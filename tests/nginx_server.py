"""A real remote cache server for tests: Debian's nginx (nginx-light has the WebDAV module that PUT
needs), started on a free 127.0.0.1 port with a config written into a temp folder (files, pid, logs
and nginx's body temp files all live there), stopped by its PID. nginx is installed with apt when
missing; the test is skipped, with apt's reason, where that cannot be done.

The server is laid out as a team would run it for kiln (docs/remote-cache.md): GET/HEAD for anyone,
PUT/DELETE only with `Authorization: Bearer <token>` (401 otherwise), any instance prefix before
/ac/<64 hex> and /cas/<64 hex>, other paths refused. One process (master_process off), so killing
its PID kills the server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

CONFIG = """\
daemon off;
master_process off;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 128; }}
http {{
  log_format kiln '$request_method $status $request_length $bytes_sent';
  access_log {access_log};
  log_not_found off;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  map $request_method $is_write {{ PUT 1; DELETE 1; default 0; }}
  map "$is_write:$http_authorization" $deny {{ "1:Bearer {token}" 0; "~^1:" 1; default 0; }}
  server {{
    listen 127.0.0.1:{port};
    root {dir}/files;
    client_max_body_size 0;
    location ~ "^/([A-Za-z0-9_.-]+/)*(ac|cas)/[0-9a-f]{{64}}$" {{
      if ($deny) {{ return 401; }}
      dav_methods PUT DELETE;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
      {limit_rate}
    }}
    location / {{ return 404; }}
  }}
}}
"""


def nginx() -> str:
    """The nginx executable; apt-get installs nginx-light once when it is missing."""
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("nginx is not installed and there is no apt-get to install it (apt-get install nginx-light)")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "nginx-light"]):
        proc = subprocess.run(command, check=False, capture_output=True, text=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if proc.returncode != 0:
            pytest.skip(f"could not install nginx-light ({' '.join(command)} exited {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}")
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None) \
        or pytest.skip("apt-get installed nginx-light but nginx is not on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NginxCache:
    folder: Path  # config, pid, logs, temp files
    token: str
    log_requests: bool = False  # access.log: method, status, bytes received, bytes sent per request (benchmarks)
    limit_rate: str = ""  # e.g. "8m": answers sent at most this fast, so a test can act mid-download
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def files(self) -> Path:
        """The server's document root: <instance>/ac/<key> and <instance>/cas/<sha256> as plain files."""
        return self.folder / "files"

    def start(self) -> NginxCache:
        executable = nginx()
        (self.folder / "tmp").mkdir(parents=True, exist_ok=True)
        self.files.mkdir(exist_ok=True)
        for attempt in range(5):  # another process may take the free port between the probe and nginx's bind
            self.port = free_port()
            user = "user root root;" if os.geteuid() == 0 else ""  # as root, workers would otherwise run as nobody
            conf = self.folder / "nginx.conf"
            access_log = f"{self.folder}/access.log kiln" if self.log_requests else "off"
            conf.write_text(CONFIG.format(user=user, dir=self.folder, token=self.token, port=self.port, access_log=access_log,
                                          limit_rate=f"limit_rate {self.limit_rate};" if self.limit_rate else ""))
            with open(self.folder / "stderr.log", "ab") as log:
                self.process = subprocess.Popen([executable, "-e", str(self.folder / "error.log"), "-p", str(self.folder), "-c", str(conf)],
                                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            if self._answers():
                return self
            self.stop()
        raise AssertionError(f"nginx did not start: {(self.folder / 'error.log').read_text(errors='replace')[-1500:]}")

    def _answers(self, within: float = 10.0) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown), then SIGKILL if it lingers; by PID."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever, as a crashed cache host would."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    def traffic(self) -> dict[str, int]:
        """From access.log (log_requests=True): requests, bytes received (uploads) and sent (downloads)."""
        lines = (self.folder / "access.log").read_text().split("\n") if (self.folder / "access.log").exists() else []
        rows = [line.split() for line in lines if line]
        return {"requests": len(rows), "bytes_in": sum(int(r[2]) for r in rows), "bytes_out": sum(int(r[3]) for r in rows),
                **{f"{method}": sum(r[0] == method for r in rows) for method in ("GET", "HEAD", "PUT")}}

    def stored(self) -> list[Path]:
        """Every file the server holds (what was uploaded)."""
        return sorted(p for p in self.files.rglob("*") if p.is_file())


def start_nginx(folder: Path, token: str = "test-token", log_requests: bool = False, limit_rate: str = "") -> NginxCache:
    return NginxCache(folder, token, log_requests, limit_rate).start()
