"""Where the shared remote cache is and how kiln may use it: the environment, else the workspace's
kiln.toml `[remote_cache]` table (the environment wins key by key).

    KILN_REMOTE_CACHE=http://host:port[/instance]   url = "..."          (off/empty: no remote cache)
    KILN_REMOTE_CACHE_TOKEN=...                     token_file = "..."   (sent as Authorization: Bearer)
    KILN_REMOTE_CACHE_UPLOAD=0|1                    upload = false|true  (default read-only)
    KILN_REMOTE_CACHE_REQUIRED=0|1                  required = false|true (a remote failure fails the build)
    KILN_REMOTE_CACHE_TIMEOUT=seconds               timeout = 30         (a stalled connection gives up after it)

The token is never read from kiln.toml itself (that file is committed): a file may name a token_file
(e.g. a CI secret mounted as a file) instead. The token is kept out of repr() and every message.
A bad value is one line naming the file or variable, the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kiln.errors import UsageError

CONFIG_FILE = "kiln.toml"
TABLE = "remote_cache"
DEFAULT_TIMEOUT = 30.0
_FILE_KEYS = ("url", "upload", "required", "timeout", "token_file")
_ENV = {"url": "KILN_REMOTE_CACHE", "token": "KILN_REMOTE_CACHE_TOKEN", "upload": "KILN_REMOTE_CACHE_UPLOAD",
        "required": "KILN_REMOTE_CACHE_REQUIRED", "timeout": "KILN_REMOTE_CACHE_TIMEOUT"}
ENV_VARIABLES = tuple(_ENV.values())
_PATH = re.compile(r"^[A-Za-z0-9._~%!$&'()*+,;=:@/-]*$")  # RFC 3986 path characters: no spaces or controls
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: what a bearer token (RFC 6750) may hold
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class RemoteConfig:
    url: str  # scheme://host[:port][/instance], no trailing slash, no credentials
    upload: bool = False
    required: bool = False
    timeout: float = DEFAULT_TIMEOUT
    token: str | None = field(default=None, repr=False)  # never printed
    required_by: str = ""  # what asked for required mode, for the error line


def config_path(root: Path) -> Path:
    return Path(root) / CONFIG_FILE


def remote_config(root: Path, environ: dict[str, str] | None = None) -> RemoteConfig | None:
    """The remote cache settings of the workspace at root, or None when there is no remote cache."""
    env = os.environ if environ is None else environ
    path = config_path(root)
    table = _file_table(path)
    where = f"{CONFIG_FILE} [{TABLE}]"
    url_text = env.get(_ENV["url"])
    if url_text is not None:
        if url_text.strip().lower() in ("", "off", "0", "false", "no"):
            return None  # the environment turns a configured remote off
        url = _url(url_text, _ENV["url"])
    elif "url" in table:
        url = _url(_string(table["url"], f"{where} url"), f"{where} url")
    else:
        return None
    upload = _flag(env, "upload", table, where)
    required = _flag(env, "required", table, where)
    return RemoteConfig(url=url, upload=upload, required=required, timeout=_timeout(env, table, where),
                        token=_token(env, table, where, Path(root)), required_by=_required_by(env, table, where) if required else "")


def _file_table(path: Path) -> dict[str, Any]:
    """kiln.toml's [remote_cache] table ({} without the file or the table), its keys checked."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(CONFIG_FILE, f"cannot be read: {err}") from None
    try:
        table = tomllib.loads(text).get(TABLE, {})
    except tomllib.TOMLDecodeError as err:
        raise UsageError(CONFIG_FILE, f"is not valid TOML: {err}") from None
    if not isinstance(table, dict):
        raise UsageError(f"{CONFIG_FILE} {TABLE}", f"must be a table ([{TABLE}]), not {table!r}")
    for key, value in table.items():
        if key == "token":
            raise UsageError(f"{CONFIG_FILE} [{TABLE}] token", "a token must not be written in a file that is committed; "
                                                               "set KILN_REMOTE_CACHE_TOKEN or name a token_file")
        if key not in _FILE_KEYS:
            raise UsageError(f"{CONFIG_FILE} [{TABLE}] {key}", f"{value!r} is not a setting; allowed: {', '.join(_FILE_KEYS)}")
    return table


def _url(text: str, where: str) -> str:
    """http(s)://host[:port][/instance] with the trailing slash dropped."""
    text = text.strip()
    try:
        parts = urlsplit(text)
    except ValueError as err:
        raise UsageError(where, f"{text!r} is not a URL ({err}); expected http://host:port[/instance]") from None
    if "@" in parts.netloc:  # before the URL is ever repeated in a message
        raise UsageError(where, "the URL must not hold credentials; set KILN_REMOTE_CACHE_TOKEN (sent as a bearer token)")
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as err:
        raise UsageError(where, f"{text!r} is not a URL ({err}); expected http://host:port[/instance]") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(where, f"{text!r} is not an http(s) URL; expected http://host:port[/instance]")
    if parts.query or parts.fragment or not _PATH.match(parts.path):
        raise UsageError(where, f"{text!r} has a query, a fragment or characters a URL path cannot hold; expected http://host:port[/instance]")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UsageError(where, f"{value!r} is not allowed; expected a string")
    return value


def _flag(env: dict[str, str], key: str, table: dict[str, Any], where: str) -> bool:
    variable = _ENV[key]
    if variable in env:
        text = env[variable].strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise UsageError(variable, f"{env[variable]!r} is not allowed; use 0 or 1")
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{where} {key}", f"{value!r} is not allowed; use true or false")
    return value


def _timeout(env: dict[str, str], table: dict[str, Any], where: str) -> float:
    variable = _ENV["timeout"]
    if variable in env:
        try:
            value: Any = float(env[variable])
        except ValueError:
            value = env[variable]
        name = variable
    else:
        value, name = table.get("timeout", DEFAULT_TIMEOUT), f"{where} timeout"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(name, f"{value!r} is not allowed; expected a number of seconds above 0, e.g. 30")
    return float(value)


def _token(env: dict[str, str], table: dict[str, Any], where: str, root: Path) -> str | None:
    if env.get(_ENV["token"]):
        return _header_safe(env[_ENV["token"]].strip(), _ENV["token"])
    if "token_file" not in table:
        return None
    name = f"{where} token_file"
    path = Path(os.path.expanduser(_string(table["token_file"], name)))
    path = path if path.is_absolute() else root / path
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(name, f"{str(path)!r} cannot be read ({type(err).__name__}); name a file holding the token") from None
    if not token:
        raise UsageError(name, f"{str(path)!r} is empty; it must hold the token")
    return _header_safe(token, f"{name} {str(path)!r}")


def _header_safe(token: str, where: str) -> str:
    """The token, if an HTTP header can carry it (else http.client's error would repeat it)."""
    if not _TOKEN.match(token):
        raise UsageError(where, "the token holds spaces, control or non-ASCII characters, which an HTTP header cannot carry "
                                "(the token itself is not shown); allowed: visible ASCII")
    return token


def _required_by(env: dict[str, str], table: dict[str, Any], where: str) -> str:
    return f"{_ENV['required']}=1" if _ENV["required"] in env else f"{where} required = true"
