"""A shared remote cache that speaks Bazel's HTTP cache protocol (stdlib http.client, no dependency).

    {url}/cas/<sha256>   an object's bytes (the local cache's objects/)
    {url}/ac/<step key>  kiln's cache entry JSON: the local entry plus "kiln": ENTRY_FORMAT

GET fetches (200 hit, 404 miss), HEAD asks whether it is there, PUT stores; {url} may end in an
instance prefix (http://host:port/team-a). nginx with WebDAV, bazel-remote (started with
--disable_http_ac_validation: kiln's AC values are JSON, not ActionResult protobufs) or an S3
bucket behind such a proxy all serve it. Nothing the server sends is trusted: an entry is checked
against its schema and key (kiln.state.cache_tiers), an object is streamed to a temp file with its
sha256 and size checked before the caller renames it in. This module only moves bytes; whether a
failure is a miss, a warning or an error is kiln.state.cache_tiers's business.

Each thread keeps one connection alive (a build asks hundreds of small HEADs); a kept-alive
connection the server has closed meanwhile is reopened once. Connecting gives up after
CONNECT_TIMEOUT; every wait for the server (each read and each write) after the configured timeout;
and a whole request, status line and headers included, once it falls behind the timeout plus the
bytes moved so far at MIN_RATE (_Paced), so a server that trickles a byte a second cannot hold a
step longer than about the timeout, whatever size an entry claims. Any of those, a refused
connection, 401/403, 5xx, a redirect (never followed: the token would go along) or another status
the protocol does not have raises RemoteUnavailable, whose message never holds the token (it is
only ever put in the Authorization header, and scrubbed from anything the server says)."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kiln.base.hashing import is_empty_folder, tree_sha256
from kiln.state.cache import listing_problem
from kiln.state.remote_config import RemoteConfig

ENTRY_FORMAT = 1  # the "kiln" field of an AC entry; another value is a miss (another kiln's layout)
CONNECT_TIMEOUT = 2.0  # seconds: a cache that does not answer a connect at once is not worth waiting for
MIN_RATE = 1 << 20  # bytes/s: a transfer slower than this (after the stall timeout) gives up
CHUNK = 1 << 20
MAX_ENTRY_BYTES = 64 << 20  # an AC entry is small JSON; a bigger answer is not one
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]+$")  # what a bearer token may hold: visible ASCII
_CLOSED_UNDER_US = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class RemoteUnavailable(Exception):
    """The remote cache cannot be used: str(err) says why in one line (never the token)."""


class _TooSlow(TimeoutError):
    """A request fell behind its pace (_Paced.wait_limit); str() is the whole one-line reason."""


class _Paced:
    """Mixin for http.client connections: each request may take the stall timeout plus its bytes
    (sent and received) at MIN_RATE, counted from begin(). Answers are read through _PacedReader,
    which waits on the socket at most what is left, so no phase (status line, headers, body) can
    be trickled out past that; the request body is paced by RemoteCache._paced."""

    stall = 30.0
    started = 0.0
    moved = 0
    pid = 0  # the process that connected it
    sock: Any

    def begin(self) -> None:
        self.started, self.moved = time.monotonic(), 0
        self.sock.settimeout(self.stall)

    def wait_limit(self) -> float:
        """How long the next wait on the socket may take; _TooSlow when the request is overdue."""
        elapsed = time.monotonic() - self.started
        left = self.stall + self.moved / MIN_RATE - elapsed
        if left <= 0:
            raise self.too_slow()
        return min(self.stall, left)

    def too_slow(self) -> _TooSlow:
        elapsed = time.monotonic() - self.started
        return _TooSlow(f"too slow: {self.moved} bytes in {elapsed:.1f} s (under {MIN_RATE >> 20} MiB/s after the first {self.stall:g} s)")

    def response_class(self, sock: Any, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:
        """http.client's answer, reading through _PacedReader instead of the socket's own file."""
        response = http.client.HTTPResponse(sock, *args, **kwargs)
        response.fp = io.BufferedReader(_PacedReader(sock, self, response.fp))
        return response


class _PacedReader(io.RawIOBase):
    """Reads the socket under the connection's pace. Holds the socket's own file (unread) until it
    is closed: that keeps the socket open for an answer that closes the connection (Connection:
    close, HTTP/1.0), which http.client hands over to the response by closing its own reference."""

    def __init__(self, sock: Any, conn: _Paced, holds: Any):
        self._sock, self._conn, self._holds = sock, conn, holds

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._holds.close()
        super().close()

    def readinto(self, buffer: Any) -> int:
        limit = self._conn.wait_limit()
        self._sock.settimeout(limit)
        try:
            got = self._sock.recv_into(buffer)
        except TimeoutError:
            if self._conn.moved and limit < self._conn.stall:  # cut short by the pace, not a silent server
                raise self._conn.too_slow() from None
            raise
        self._conn.moved += got
        return got


class _PacedHTTP(_Paced, http.client.HTTPConnection):
    pass


class _PacedHTTPS(_Paced, http.client.HTTPSConnection):
    pass


class RemoteCache:
    """Action cache + CAS over HTTP, the remote twin of kiln.state.cache.Cache's get_entry /
    put_entry / has_object / object bytes. Thread-safe: each thread has its own connection."""

    def __init__(self, config: RemoteConfig):
        parts = urlsplit(config.url)
        self.config = config
        self.url = config.url
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "", parts.port
        self._prefix = parts.path.rstrip("/")
        self._local = threading.local()
        self._lock = threading.Lock()
        if config.token is not None and not _HEADER_SAFE.match(config.token):  # http.client would repeat it in its ValueError
            raise ValueError("the remote cache token holds characters an HTTP header cannot carry (spaces, controls, non-ASCII)")
        self.bytes_down = self.bytes_up = 0  # object and entry bytes moved, for benchmarks and reports

    # ---- the action cache ----------------------------------------------------------------------

    def get_entry(self, key: str) -> Any | None:
        """The JSON stored under /ac/<key> (not yet checked: see entry_problem), or None when absent.
        An answer that is not JSON comes back as the string "<not JSON>" so the caller can say so."""
        response = self._send("GET", f"/ac/{key}")
        if response.status == 404:
            self._finish(response)
            return None
        self._expect(response, "GET", (200,))
        body = self._read(response, MAX_ENTRY_BYTES + 1)
        self._count(down=len(body))
        if len(body) > MAX_ENTRY_BYTES:
            self._drop()  # the rest is not read: this connection cannot be reused
            return "<not JSON>"
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
            return "<not JSON>"

    def has_entry(self, key: str) -> bool:
        response = self._send("HEAD", f"/ac/{key}")
        self._finish(response)
        if response.status == 404:
            return False
        self._expect(response, "HEAD", (200,))
        return True

    def put_entry(self, key: str, entry: dict[str, Any]) -> None:
        data = (json.dumps(entry, sort_keys=True, indent=1) + "\n").encode()
        response = self._send("PUT", f"/ac/{key}", lambda: iter((data,)), len(data), {"Content-Type": "application/json"})
        self._finish(response)
        self._expect(response, "PUT", (200, 201, 204))
        self._count(up=len(data))

    # ---- the content-addressed store -----------------------------------------------------------

    def has_object(self, sha256: str, size: int) -> bool:
        """Whether /cas/<sha256> is there with `size` bytes (a blob of another size is as good as absent:
        the caller uploads the right one over it)."""
        response = self._send("HEAD", f"/cas/{sha256}")
        self._finish(response)
        if response.status == 404:
            return False
        self._expect(response, "HEAD", (200,))
        return response.getheader("Content-Length") in (None, str(size))

    def fetch_object(self, sha256: str, size: int, dest: Path) -> str | None:
        """Stream /cas/<sha256> into the new file dest, hashing as it comes. None when dest now holds
        exactly those `size` bytes; else what is wrong with the server's copy (dest is removed). A
        transfer that breaks off raises RemoteUnavailable (dest removed too)."""
        response = self._send("GET", f"/cas/{sha256}")
        if response.status == 404:
            self._finish(response)
            return "not on the server"
        self._expect(response, "GET", (200,))
        declared = response.getheader("Content-Length")
        if declared is not None and declared != str(size):
            self._drop()  # not worth downloading: its size already says it is not the object
            return f"the server's copy has {declared} bytes, the entry says {size}"
        try:
            got, length = self._stream_to(response, dest, size)
            if declared is not None and length < size:  # http.client ends a cut-off body quietly
                self._drop()
                raise RemoteUnavailable(f"the connection closed after {length} of {size} bytes")
        except BaseException:  # KeyboardInterrupt and a full disk too: no partial file, no half-read connection
            self._drop()
            dest.unlink(missing_ok=True)
            raise
        if length != size or got != sha256:
            dest.unlink(missing_ok=True)
            return f"the server's copy has {length} bytes with sha256 {got[:16]}..., not the {size} bytes it is named for"
        return None

    def put_object(self, sha256: str, source: Path) -> None:
        """PUT a local object file to /cas/<sha256>, streamed in CHUNK-sized reads. OSError (not
        RemoteUnavailable) when the local file cannot be read or did not hold those bytes: the
        server may then have a wrong copy (readers check), and the caller must not upload an entry."""
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            sent: list[Any] = []
            response = self._send("PUT", f"/cas/{sha256}", lambda: self._file_chunks(f, size, sent), size,
                                  {"Content-Type": "application/octet-stream"})
        self._finish(response)
        self._expect(response, "PUT", (200, 201, 204))
        self._count(up=size)
        if not sent or sent[-1] != (sha256, size):
            raise OSError(f"the local object {sha256[:16]} changed while it was uploaded")

    # ---- transport -----------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: Callable[[], Iterator[bytes]] | None = None, length: int = 0,
              extra: dict[str, str] | None = None) -> http.client.HTTPResponse:
        """One request on this thread's connection; its response (headers read, body not yet)."""
        headers = dict(extra or {})
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        if body is not None:
            headers["Content-Length"] = str(length)
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is not None and (conn.sock is None or conn.pid != os.getpid()):  # closed after its last answer
                self._drop()  # (Connection: close), or a forked child's copy of its parent's socket: reconnect
                conn = None  # here, not in http.client, so the timeouts stay ours
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            try:
                conn.begin()
                conn.request(method, self._prefix + path, body=self._paced(conn, body()) if body is not None else None, headers=headers)
                return conn.getresponse()
            except (OSError, http.client.HTTPException) as err:
                answer = self._answer_despite(conn, err) if body is not None else None
                if answer is not None:
                    return answer  # the server refused the upload before reading it all: say its status
                self._drop()
                if reused and attempt == 0 and isinstance(err, _CLOSED_UNDER_US):
                    continue  # a kept-alive connection the server closed while idle: once more on a new one
                raise self._unavailable(_describe(err, self.config.timeout)) from None
            except BaseException:  # KeyboardInterrupt mid-request: the connection is in no state to reuse
                self._drop()
                raise
        raise AssertionError("unreachable")

    def _connect(self) -> _Paced:
        kind = _PacedHTTPS if self._https else _PacedHTTP
        conn = kind(self._host, self._port, timeout=min(CONNECT_TIMEOUT, self.config.timeout), blocksize=CHUNK)
        conn.stall, conn.pid = self.config.timeout, os.getpid()  # connected: from now on the stall timeout and the pace apply
        try:
            conn.connect()
        except OSError as err:
            conn.close()
            raise self._unavailable(_describe(err, min(CONNECT_TIMEOUT, self.config.timeout))) from None
        self._local.conn = conn
        return conn

    @staticmethod
    def _paced(conn: _Paced, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """An upload's chunks, each to be sent by the time its bytes at MIN_RATE allow (sendall's
        timeout bounds its whole call), or _TooSlow."""
        for chunk in chunks:
            conn.moved += len(chunk)
            conn.sock.settimeout(conn.wait_limit())
            yield chunk

    @staticmethod
    def _answer_despite(conn: http.client.HTTPConnection, err: Exception) -> http.client.HTTPResponse | None:
        """A server may refuse an upload (401, 413) and close before reading the body: the write then
        fails, but the answer is waiting. Read it, if there is one and it is a refusal (a success
        for bytes the server never got would let an entry name a cut-off object)."""
        if not isinstance(err, (BrokenPipeError, ConnectionResetError)):
            return None
        try:
            answer = conn.getresponse()
        except (OSError, http.client.HTTPException):
            return None
        return answer if answer.status >= 300 else None

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _finish(self, response: http.client.HTTPResponse) -> None:
        """Read what is left of a small answer (an error page, a HEAD's nothing) so the connection can be reused."""
        self._read(response, 1 << 16)
        if not response.isclosed():
            self._drop()

    def _read(self, response: http.client.HTTPResponse, limit: int) -> bytes:
        try:
            return response.read(limit)
        except (OSError, http.client.HTTPException) as err:
            self._drop()
            raise self._unavailable(_describe(err, self.config.timeout)) from None

    def _expect(self, response: http.client.HTTPResponse, method: str, allowed: tuple[int, ...]) -> None:
        if response.status in allowed:
            return
        if not response.isclosed():
            self._finish(response)
        hint = {401: "; check KILN_REMOTE_CACHE_TOKEN", 403: "; check KILN_REMOTE_CACHE_TOKEN",
                405: "; the server does not take this method here (WebDAV PUT off, or another URL layout)"}.get(response.status, "")
        if 300 <= response.status < 400:
            hint = "; redirects are not followed (the token would go along): configure the URL they lead to"
        reason = " ".join(str(response.reason).split())[:80]
        raise self._unavailable(f"HTTP {response.status} {reason} on {method}{hint}")

    def _unavailable(self, text: str) -> RemoteUnavailable:
        """RemoteUnavailable(text) with the token scrubbed out of it: text may repeat what the server sent."""
        if self.config.token:
            text = text.replace(self.config.token, "<token>")
        return RemoteUnavailable(text)

    def _stream_to(self, response: http.client.HTTPResponse, dest: Path, size: int) -> tuple[str, int]:
        """Write the body to dest, hashing it; stops one chunk past `size` (a longer body is not the
        object). The connection's pace (_Paced) bounds how long it may take."""
        hasher, length = hashlib.sha256(), 0
        with open(dest, "xb") as out:
            while True:
                chunk = self._read(response, CHUNK)
                if not chunk:
                    break
                hasher.update(chunk)
                out.write(chunk)
                length += len(chunk)
                self._count(down=len(chunk))
                if length > size:
                    self._drop()
                    break
        return hasher.hexdigest(), length

    @staticmethod
    def _file_chunks(f: Any, size: int, sent: list[Any]) -> Iterator[bytes]:
        """At most `size` bytes of f from its start (the Content-Length sent), hashed: (sha256,
        bytes) is appended to `sent` when all were read (a retry starts again)."""
        f.seek(0)
        hasher, length = hashlib.sha256(), 0
        while length < size and (chunk := f.read(min(CHUNK, size - length))):
            hasher.update(chunk)
            length += len(chunk)
            yield chunk
        sent.append((hasher.hexdigest(), length))

    def _count(self, down: int = 0, up: int = 0) -> None:
        with self._lock:
            self.bytes_down += down
            self.bytes_up += up


def entry_problem(entry: Any, key: str) -> str | None:
    """Why an AC answer cannot be used as kiln's entry for `key` (None when it can): the format, the
    key it names, and outputs whose digests are 64 hex digits (they become local object paths) and
    sizes non-negative integers; a folder's listing passes Cache.restore's own checks
    (kiln.state.cache.listing_problem: paths inside the folder) and adds up to its digest."""
    if not isinstance(entry, dict):
        return "it is not a JSON object"
    if entry.get("key") != key:
        return "it names another key"
    outputs, info = entry.get("outputs"), entry.get("info")
    if not isinstance(outputs, dict) or not outputs or not isinstance(info, dict):
        return "it has no outputs or no info"
    for role, out in outputs.items():
        if not _output_ok(out):
            return f"its output {role!r} is malformed"
    return None


def _output_ok(out: Any) -> bool:
    if not isinstance(out, dict) or not isinstance(out.get("name"), str) or not _size_ok(out.get("bytes")):
        return False
    if "files" not in out:
        return _digest_ok(out.get("sha256"))
    files = out["files"]
    if not _digest_ok(out.get("sha256")) or not isinstance(files, list):
        return False
    for line in files:
        if not (isinstance(line, list) and len(line) == 3 and isinstance(line[0], str) and isinstance(line[1], str) and _size_ok(line[2])):
            return False
        if not is_empty_folder(line[0]) and not _digest_ok(line[1]):
            return False
    # the same checks as the local restore's, before anything is written: no path outside the
    # folder, none twice, none under a file; and the listing must add up to the folder's digest
    return listing_problem(files) is None and tree_sha256((rel, sha256) for rel, sha256, _ in files) == out["sha256"]


def _digest_ok(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.match(value) is not None


def _size_ok(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _describe(err: BaseException, timeout: float) -> str:
    """One line for a failed connection, without anything the request carried."""
    if isinstance(err, _TooSlow):
        return str(err)
    if isinstance(err, TimeoutError):  # "timed out", or TLS's "The read operation timed out"
        return f"no answer within {timeout:g} s"
    text = " ".join(str(err).split()) or "connection closed"
    return f"{type(err).__name__}: {text}"[:300]
