"""Tool environments: a tool whose dependencies conflict with kiln's own runs in a Python environment
kiln makes for it from pinned requirements (the way pre-commit and tox isolate tools).

A tool environment is named by a requirements file shipped with kiln (kiln/base/toolenvs/<name>.txt)
that pins, with `==`, every package the tool adds to kiln's environment. kiln creates it on first
use and reuses it afterwards:

- where: $KILN_TOOLENV_DIR, else $XDG_CACHE_HOME/kiln/envs, else ~/.cache/kiln/envs (never in build/:
  one environment serves every workspace), in a folder `<name>-<hash>` whose hash covers the
  requirements, the Python version and kiln's environment it overlays;
- how: `python -m venv --without-pip` in a temp folder, then kiln's own pip installs exactly the
  pinned packages there (`pip --python <env> install --no-deps`), so pip neither resolves nor sees,
  let alone touches, kiln's environment; the installed set is checked against the pins (the lock);
  then a .pth file makes the environment see kiln's site-packages *after* its own. The tool's
  packages shadow kiln's versions there (typing-extensions 4.12 for litert-torch), everything else
  (torch, numpy, kiln itself) is kiln's, so torch is neither downloaded nor copied. The modules the
  environment names are imported once as a check, and the temp folder is renamed into place: a
  killed creation leaves no half environment. A second creator (another build) waits on a lock
  file and reuses the first one's environment.
- errors: pip's output goes to `<name>-<hash>.log` beside the environment, never the terminal; a
  failed install is one StepError naming the environment, the requirement pip could not install and
  that log.

Keys: a rule lists the tool environment among its tools as "toolenv:<name>" (kiln.base.tools reads
it): the key then holds the environment's identity, the sha256 of its lock (the pins as sorted
`name==version` lines) and the Python version (`version()`). The environment holds exactly the
pinned packages (checked at creation against what pip installed, and kept as kiln-lock.txt in it),
so that identity is its `pip freeze`; editing the pins changes the keys of every step that uses it.
kiln's own packages that the environment sees (torch...) key those steps through their own names in
the rule's tools, as for any rule. Nothing is created while planning: keys need only the file.
Running kiln code in an environment: kiln.runtime.toolchild.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import kiln
from kiln.errors import StepError, one_line

PREFIX = "toolenv:"  # how a rule names a tool environment in its tools
_REQUIREMENTS = Path(__file__).parent / "toolenvs"
# name -> modules imported in the new environment as its check (a broken install fails at creation)
TOOL_ENVS: dict[str, tuple[str, ...]] = {
    "litert_torch": ("litert_torch", "ai_edge_quantizer"),
}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
_PARENT_PTH = "zzz-kiln-parent.pth"  # last in the folder's .pth order: kiln's site-packages go after the env's own
_LOCK = "kiln-lock.txt"


@dataclass(frozen=True)
class ToolEnv:
    """A tool environment: its name, its pinned requirements and the modules that must import in it."""

    name: str
    requirements: Path
    imports: tuple[str, ...] = ()

    def pins(self, step: str = "toolenv") -> dict[str, str]:
        """{normalized distribution name: version} of the requirements; any line that is not a
        `name==version` pin is a StepError (kiln installs without resolving, so only pins make sense)."""
        pins = {}
        for number, line in enumerate(self.requirements.read_text().splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            match = _PIN.match(text)
            if match is None:
                raise StepError(step, f"{self.requirements}:{number}: {text!r} is not an exact pin; tool environment requirements are `name==version` lines")
            pins[normalized(match[1])] = match[2]
        return pins

    def lock_text(self) -> str:
        """The lock the environment will have: its pins as sorted `name==version` lines (what
        `kiln-lock.txt` in a created environment holds, checked against what pip installed)."""
        return "".join(f"{name}=={version}\n" for name, version in sorted(self.pins().items()))

    def version(self) -> str:
        """The environment's identity for step keys: the hash of its lock and the Python version
        (comments in the requirements file do not change it)."""
        digest = hashlib.sha256(self.lock_text().encode()).hexdigest()[:16]
        return f"sha256:{digest} py{sys.version_info[0]}.{sys.version_info[1]}"

    def folder(self) -> Path:
        """Where it lives: the identity, and the kiln environment it overlays (a .pth points there, so
        another venv of kiln gets its own)."""
        parent = "\n".join(parent_site_dirs())
        digest = hashlib.sha256(f"{self.version()}\n{sys.version}\n{parent}".encode()).hexdigest()[:16]
        return envs_root() / f"{self.name}-{digest}"

    def python(self) -> Path:
        return self.folder() / "bin" / "python"

    def log(self) -> Path:
        return self.folder().with_name(self.folder().name + ".log")


def tool_env(name: str) -> ToolEnv:
    """The tool environment kiln ships under this name."""
    if name not in TOOL_ENVS:
        raise KeyError(f"no tool environment {name!r} (kiln has {sorted(TOOL_ENVS)})")
    return ToolEnv(name, _REQUIREMENTS / f"{name}.txt", TOOL_ENVS[name])


def envs_root() -> Path:
    if os.environ.get("KILN_TOOLENV_DIR"):
        return Path(os.environ["KILN_TOOLENV_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "kiln" / "envs"


def parent_site_dirs() -> list[str]:
    """kiln's own site-packages folders (those of the interpreter running kiln)."""
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ensure(env: ToolEnv, step: str = "toolenv") -> Path:
    """The environment's Python, the environment created first if it does not exist yet."""
    folder = env.folder()
    if (folder / _LOCK).is_file():
        return env.python()
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{folder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another creator: wait, then find its environment
        if not (folder / _LOCK).is_file():
            _create(env, folder, step)
    return env.python()


def _create(env: ToolEnv, folder: Path, step: str) -> None:
    import shutil
    import subprocess

    pins = env.pins(step)
    for stale in folder.parent.glob(f".tmp-{folder.name}-*"):  # a killed creation's (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    temp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    log_path = env.log()
    print(f"creating tool environment {env.name!r} in {folder} (pip's log: {log_path})", flush=True)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {
        "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    try:
        with open(log_path, "w") as log:
            def run(argv: list[str]) -> int:
                log.write(f"$ {' '.join(argv)}\n")
                log.flush()
                return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=clean, stdin=subprocess.DEVNULL).returncode

            if run([sys.executable, "-m", "venv", "--without-pip", str(temp)]) != 0:
                raise StepError(step, f"tool environment {env.name!r}: python -m venv failed (log: {log_path})")
            python = temp / "bin" / "python"
            if pins and run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-compile",
                             "-r", str(env.requirements)]) != 0:
                log.flush()
                raise StepError(step, f"tool environment {env.name!r}: {pip_failure(log_path.read_text())} (log: {log_path})")
            site_dir = _site_dir(temp)
            lock_text = _check_lock(env, pins, site_dir, step, log_path)
            (site_dir / _PARENT_PTH).write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in parent_site_dirs()))
            check = "; ".join(["import kiln", *(f"import {m}" for m in env.imports), "print(kiln.__file__)"])
            log.write(f"$ {python} -c {check!r}\n")
            log.flush()
            found = subprocess.run([str(python), "-c", check], capture_output=True, text=True, env=clean, stdin=subprocess.DEVNULL)
            log.write(found.stdout + found.stderr)
            if found.returncode != 0:
                last = [line for line in found.stderr.splitlines() if line.strip()]
                raise StepError(step, f"tool environment {env.name!r}: {check!r} failed: {one_line(last[-1]) if last else 'no output'} (log: {log_path})")
            if found.stdout.strip().splitlines()[-1:] != [kiln.__file__]:  # the child must run this kiln's code
                raise StepError(step, f"tool environment {env.name!r} imports kiln from {found.stdout.strip()!r}, not {kiln.__file__} (log: {log_path})")
            (temp / _LOCK).write_text(lock_text)
        os.rename(temp, folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _site_dir(prefix: Path) -> Path:
    import sysconfig

    return Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))


def _check_lock(env: ToolEnv, pins: dict[str, str], site_dir: Path, step: str, log_path: Path) -> str:
    """The environment's own distributions as `name==version` lines (its lock), which must be exactly
    the pins: what kiln keys on is what is installed."""
    from importlib import metadata

    installed = {normalized(d.metadata["Name"]): d.version for d in metadata.distributions(path=[str(site_dir)])}
    if installed != pins:
        differs = sorted(set(installed.items()) ^ set(pins.items()))
        raise StepError(step, f"tool environment {env.name!r}: installed packages differ from {env.requirements.name}: {differs[:5]} (log: {log_path})")
    return env.lock_text()


def pip_failure(log: str) -> str:
    """pip's failure on one line: the requirement it could not install, when it says which."""
    for pattern in (r"No matching distribution found for (\S+)", r"Could not find a version that satisfies the requirement (\S+)",
                    r"Failed to build (\S+)"):
        found = re.findall(pattern, log)
        if found:
            return f"pip could not install {found[-1]}"
    errors = [line for line in log.splitlines() if line.startswith("ERROR:")]
    return f"pip install failed: {one_line(errors[-1])[:300]}" if errors else "pip install failed"


def lock(env: ToolEnv) -> str:
    """The lock of a created environment: its own distributions, `name==version` per line."""
    return (env.folder() / _LOCK).read_text()
