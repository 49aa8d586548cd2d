"""The caches a step looks in before it runs: the local cache, then the shared remote cache (if one
is configured: kiln.state.remote_config), then nothing (the rule runs). Built once per process and
workspace (tiers_for), so the remote's "switched off after a failure" holds for the whole build.

Hit in the remote cache: the entry is fetched and checked (schema, key), every object it names that
the local cache lacks is streamed to a temp file in the local objects/ folder, its sha256 and size
checked, and only then renamed in; when all are there the entry is written locally and the ordinary
local restore copies the outputs out (re-hashing them again). An entry whose object is missing or has
other bytes is a miss, said on stderr, never an error: the step runs.

Upload (when enabled): after a step ran, or was restored from the local cache while the remote lacks
its entry, each object the remote does not have (HEAD) is PUT from the local object file, and the
entry last, so no reader ever sees an entry before its objects.

A remote that cannot be reached, stalls, or answers 401/403/5xx gives one warning on stderr and is not
used again in this process (every step still builds, locally); in required mode that failure is the
step's error instead. Nothing local is written until it is verified, so a dying server cannot
corrupt the local cache or the workspace.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from kiln.base.temps import sweep_stale_temps, temp_path
from kiln.errors import KilnError
from kiln.state.cache import Cache, entry_objects
from kiln.state.remote_cache import ENTRY_FORMAT, RemoteCache, RemoteUnavailable, entry_problem
from kiln.state.remote_config import ENV_VARIABLES, RemoteConfig, config_path, remote_config

LOCAL, REMOTE = "cache", "remote cache"  # where a hit came from, as the step's reason says it


class RemoteRequired(KilnError):
    """A remote cache failure where the settings say the build must not go on without it."""

    exit_code = 1


class CacheTiers:
    def __init__(self, local: Cache, remote: RemoteCache | None = None):
        self.local = local
        self.remote = remote
        self.down: str | None = None  # why the remote was switched off, once it was
        self._lock = threading.Lock()

    @property
    def config(self) -> RemoteConfig | None:
        return self.remote.config if self.remote is not None else None

    # ---- before a step runs --------------------------------------------------------------------

    def restore(self, key: str, destinations: dict[str, Path], step: str = "") -> tuple[dict[str, Any], str] | None:
        """Restore the step's outputs from the first cache that has them: (entry, LOCAL or REMOTE), or
        None when neither has (nothing written to destinations then)."""
        entry = self.local.restore(key, destinations)
        if entry is not None:
            return entry, LOCAL
        if not self._usable():
            return None
        try:
            if self._download(key, set(destinations), step):
                entry = self.local.restore(key, destinations)
        except RemoteUnavailable as err:
            self._went_down(err)
        except OSError as err:  # local: a full disk, or a name this filesystem cannot hold; the step runs and says
            self.local.entry_path(key).unlink(missing_ok=True)
            self._note(f"entry {key[:16]} for {step or 'a step'} could not be restored: {type(err).__name__}: {err}")
            entry = None
        return (entry, REMOTE) if entry is not None else None

    def _download(self, key: str, roles: set[str], step: str) -> bool:
        """Bring the remote entry for key and its objects into the local cache. False (having written
        no entry) when the remote has none, or one this step cannot use."""
        assert self.remote is not None
        entry = self.remote.get_entry(key)
        if entry is None:
            return False
        if isinstance(entry, dict) and entry.get("kiln") != ENTRY_FORMAT:
            return False  # written by a kiln with another entry layout: a miss, not a fault
        problem = entry_problem(entry, key)
        if problem is not None:
            self._note(f"entry {key[:16]} for {step or 'a step'} is ignored: {problem}")
            return False
        if set(entry["outputs"]) != roles:
            return False
        for sha256, size in entry_objects(entry).items():
            if self.local.has_object(sha256, size):
                continue
            problem = self._fetch(sha256, size)
            if problem is not None:  # a poisoned or half-evicted server: build locally
                self._note(f"object {sha256[:16]} of {step or 'a step'} is not used: {problem}")
                return False
        self.local.put_entry(key, {k: v for k, v in entry.items() if k != "kiln"})
        return True

    def _fetch(self, sha256: str, size: int) -> str | None:
        """One object into the local cache, verified before it is renamed in; None, or what was wrong."""
        assert self.remote is not None
        target = self.local.object_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(target.parent)
        temp = temp_path(target, "remote")
        try:
            problem = self.remote.fetch_object(sha256, size, temp)
            if problem is None:
                self.local.adopt_object(sha256, temp)
            return problem
        finally:
            temp.unlink(missing_ok=True)

    # ---- after a step ran ----------------------------------------------------------------------

    def store(self, key: str, outputs: dict[str, dict[str, Any]], root: Path, info: dict[str, Any]) -> None:
        """Keep a finished step's outputs in the local cache (share() uploads them)."""
        self.local.store(key, outputs, root, info)

    def share(self, key: str, ran: bool) -> None:
        """Upload the step's local entry and its objects, when uploads are on: always after the step
        ran, and after a local restore only when the remote lacks the entry (a warm CI machine
        filling an empty remote)."""
        if self.config is None or not self.config.upload or not self._usable():
            return
        assert self.remote is not None
        entry = self.local.get_entry(key)
        if entry is None:
            return
        try:
            if not ran and self.remote.has_entry(key):
                return
            for sha256, size in entry_objects(entry).items():
                if not self.local.has_object(sha256, size):
                    self._note(f"entry {key[:16]} is not uploaded: its object {sha256[:16]} left the local cache")
                    return
                if not self.remote.has_object(sha256, size):
                    self.remote.put_object(sha256, self.local.object_path(sha256))
            self.remote.put_entry(key, entry | {"kiln": ENTRY_FORMAT})  # last: readers never see an entry before its objects
        except RemoteUnavailable as err:
            self._went_down(err)
        except OSError as err:  # a local object gone or changed meanwhile (gc, an edited hard link): no entry goes up
            self._note(f"entry {key[:16]} is not uploaded: {type(err).__name__}: {err}")

    # ---- failures ------------------------------------------------------------------------------

    def _usable(self) -> bool:
        if self.remote is None:
            return False
        if self.down is not None:
            self._raise_if_required(self.down)
            return False
        return True

    def _went_down(self, err: RemoteUnavailable) -> None:
        """Switch the remote off for the rest of the process: one warning (the first failure), or the
        error in required mode."""
        with self._lock:
            first = self.down is None
            if first:
                self.down = str(err)
        self._raise_if_required(self.down or str(err))
        if first:
            _say(f"kiln: remote cache {self.remote.url if self.remote else '?'} unreachable ({err}); building locally")

    def _raise_if_required(self, why: str) -> None:
        config = self.config
        if config is not None and config.required:
            raise RemoteRequired(f"remote cache {config.url} unreachable ({why}) and {config.required_by} "
                                 "requires it; unset that to build locally without it")

    def _note(self, text: str) -> None:
        _say(f"kiln: remote cache {self.remote.url if self.remote else '?'}: {text}")


def _say(line: str) -> None:
    """To the terminal, even while doit captures a task's output (sys.stderr is its buffer then)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(line + "\n")
    stream.flush()


# ---- one CacheTiers per process and workspace settings --------------------------------------------

_TIERS: dict[tuple, CacheTiers] = {}
_TIERS_LOCK = threading.Lock()


def tiers_for(root: Path) -> CacheTiers | None:
    """The caches of the workspace at root (None when the local cache is off: downloads land in it,
    so the remote needs it). The same object for the whole process while the settings (environment,
    kiln.toml) are unchanged. Raises kiln.errors.UsageError for a bad setting."""
    local = Cache.for_root(root)
    if local is None:
        return None
    path = config_path(root)
    try:
        stat = path.stat()
        stamp: tuple | None = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None
    settings = (os.fspath(root), os.fspath(local.folder), tuple(os.environ.get(v) for v in ENV_VARIABLES), stamp)
    with _TIERS_LOCK:
        tiers = _TIERS.get(settings)
        if tiers is None:
            config = remote_config(root)
            tiers = _TIERS[settings] = CacheTiers(local, RemoteCache(config) if config is not None else None)
    return tiers
