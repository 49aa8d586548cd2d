"""Cold builds of example manifests: this working tree against a base commit, side by side.

Each build runs `kiln --root <fresh workspace> build <model>` in a temporary workspace holding a copy
of the side's own manifests/<model>.toml, manifests/data/ and manifests/models/, with the local cache
off (KILN_CACHE=off) and no download (HF_HUB_OFFLINE=1). Measured per build: the wall time of the
command and the sum of the steps' own times (report.json, per-step "last_run_seconds"; above the wall
time when --jobs runs steps side by side) and the 5-minute load average (other users of the cores).
The base commit is extracted with `git archive` into the temporary folder and run from there: its kiln (src/ and
build_rules/) is the one imported, in the build process and in every child process it starts (a
sitecustomize on PYTHONPATH takes the editable install's import redirect out of sys.path's way; the
paths imported are printed before each side's first build). Its native extension kiln._native is the
installed one when csrc/ and CMakeLists.txt are unchanged since the base, and is otherwise compiled
from the base's sources into the temporary folder (cmake + ninja, nanobind from the venv; the shared
venv is not touched). Afterwards the artifacts of the two sides (every file of every artifact listed
in build/<model>/kiln.lock.json) are compared by sha256 and every difference is named; the exit
status is 1 when any differs or a build failed. Everything temporary is removed at the end.
TFLite steps run kiln in a tool environment (kiln.runtime.toolchild), which drops PYTHONPATH: those
children import the working tree's kiln on both sides (a note says so when src/ differs).

The default set also builds "bert:onnx_fp32": bert.toml with only its onnx_fp32 target (reference,
export, simplify, validate), the single-target build issue 19 times.

Run (from the repository root, venv active; nothing else heavy running, the numbers are wall times):

    python benchmarks/bench_cold.py                        # bert and tinycnn, base HEAD~1, once
    python benchmarks/bench_cold.py --models bert --base 70c0d8a --jobs 2 --repeat 3

Takes twice the sum of the cold builds per repeat, plus ~10 s when the base's native extension must
be compiled: on the 2-core machine 2 x (215-230 s bert + 45 s tinycnn), about 9.5 minutes.
A build that fails is reported (its log's last lines) and leaves the comparison for that model out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# In the base's processes (the build and its children, which inherit PYTHONPATH): drop the editable
# install's finder, which sits first on sys.meta_path and would send `import kiln` to the working tree.
SHIM = '''\
import os, sys
_src = os.environ.get("KILN_BENCH_SRC")
if _src:
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__name__.startswith("ScikitBuild")]
    if sys.path[:1] != [_src]:
        sys.path.insert(0, _src)
'''

WHICH = ("import kiln, kiln.build_rules, kiln._native; "
         "print(kiln.__file__); print(list(kiln.build_rules.__path__)[0]); print(kiln._native.__file__)")


def main() -> int:
    args = _parser().parse_args()
    base = _git("rev-parse", "--verify", f"{args.base}^{{commit}}").strip()
    head = _git("rev-parse", "--short", "HEAD").strip()
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-cold-"))
    try:
        sides = {"base": _prepare_base(base, tmp), "current": _Side("current", REPO, dict(os.environ))}
        print(f"base    = {base[:10]} ({args.base}), extracted to {sides['base'].tree}")
        print(f"current = working tree at {REPO} (HEAD {head}{', with uncommitted changes' if dirty else ''})")
        _warn_tool_children(base, args.models)
        _warn_stale_native()
        for side in sides.values():
            _show_imports(side, tmp)
        results: dict[tuple[str, str], list[dict]] = {}
        hashes: dict[tuple[str, str], dict[str, str] | None] = {}
        for repeat in range(args.repeat):
            for model in args.models:
                for name in ("base", "current"):  # interleaved: a slow patch of the machine hits both sides
                    run = _cold_build(sides[name], model, tmp / f"ws-{name}-{model}-{repeat}", args.jobs, keep_hashes=repeat == 0)
                    results.setdefault((model, name), []).append(run)
                    if repeat == 0:
                        hashes[(model, name)] = run.pop("hashes")
                    print(f"  {model:8s} {name:7s} run {repeat + 1}: wall {run['wall']:7.1f} s, steps {run['steps']:7.1f} s, "
                          f"load average {run['load']:.1f}"
                          + ("" if run["ok"] else "  FAILED"), flush=True)
        _print_table(results, args)
        return _compare_artifacts(hashes, args.models)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["bert", "tinycnn", "bert:onnx_fp32"],
                        help="manifest names in manifests/, or model:target for that manifest with one target (default: bert tinycnn bert:onnx_fp32)")
    parser.add_argument("--base", default="HEAD~1", help="git revision to compare with (default: HEAD~1)")
    parser.add_argument("--jobs", type=int, help="passed to `kiln build -n` (default: kiln's own)")
    parser.add_argument("--repeat", type=int, default=1, help="cold builds per model and side; the table shows medians")
    return parser


class _Side:
    def __init__(self, name: str, tree: Path, env: dict[str, str]):
        self.name, self.tree, self.env = name, tree, env


def _git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=REPO, check=True, capture_output=True, text=True).stdout


def _prepare_base(rev: str, tmp: Path) -> _Side:
    """The base commit's files in tmp/base, importable as kiln: build_rules/ where the wheel puts it
    (kiln/build_rules) and a kiln._native that matches the base's csrc/."""
    tree = tmp / "base"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=REPO, check=True, capture_output=True).stdout
    archive_path = tmp / "base.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(tree, filter="data")
    archive_path.unlink()
    (tree / "src" / "kiln" / "build_rules").symlink_to(tree / "build_rules", target_is_directory=True)
    _place_native(rev, tree, tmp)
    shim = tmp / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    src = str(tree / "src")
    env = dict(os.environ) | {"KILN_BENCH_SRC": src, "PYTHONPATH": os.pathsep.join([str(shim), src])}
    return _Side("base", tree, env)


def _place_native(rev: str, tree: Path, tmp: Path) -> None:
    import kiln._native

    installed = Path(kiln._native.__file__)
    unchanged = subprocess.run(["git", "diff", "--quiet", rev, "--", "csrc", "CMakeLists.txt"], cwd=REPO).returncode == 0
    if unchanged:
        print(f"native: csrc/ and CMakeLists.txt unchanged since the base: both sides use {installed}")
        shutil.copy2(installed, tree / "src" / "kiln" / installed.name)
        return
    print("native: csrc/ or CMakeLists.txt changed since the base: compiling the base's kiln._native into the temp folder ...", flush=True)
    build = tmp / "native-build"
    started = time.monotonic()
    configure = ["cmake", "-S", str(tree), "-B", str(build), "-G", "Ninja", "-DSKBUILD=2", "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}"]
    for argv in (configure, ["cmake", "--build", str(build), "--target", "_native"]):
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_cold: cannot build the base's native extension ({' '.join(argv[:2])} failed):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    built = next(build.glob("_native*.so"), None)
    if built is None:
        sys.exit(f"bench_cold: the base's native build left no _native*.so in {build}")
    shutil.copy2(built, tree / "src" / "kiln" / installed.name)
    shutil.rmtree(build, ignore_errors=True)
    print(f"native: base's kiln._native compiled in {time.monotonic() - started:.0f} s")


def _warn_tool_children(rev: str, models: list[str]) -> None:
    """Tool-environment children (kiln.runtime.toolchild: the TFLite conversions) drop PYTHONPATH, so
    in both runs they import the working tree's kiln; say so when that code differs from the base."""
    import tomllib

    def formats(model: str) -> set[str]:
        targets = tomllib.loads((REPO / "manifests" / f"{model.partition(':')[0]}.toml").read_text()).get("targets", {})
        return {t.get("format") for t in targets.values()}

    uses_toolenv = [m for m in models if "tflite" in formats(m)]
    changed = subprocess.run(["git", "diff", "--quiet", rev, "--", "src", "build_rules"], cwd=REPO).returncode != 0
    if uses_toolenv and changed:
        print(f"note: {', '.join(uses_toolenv)}: the TFLite steps' tool-environment children drop PYTHONPATH and import the working "
              "tree's kiln on both sides (src/ or build_rules/ differ from the base)")


def _warn_stale_native() -> None:
    """The current side runs the installed kiln._native: say so when csrc/ was edited after it was built."""
    import kiln._native

    built = Path(kiln._native.__file__).stat().st_mtime
    sources = [p for p in [*(REPO / "csrc").rglob("*"), REPO / "CMakeLists.txt"] if p.is_file()]
    newer = [p.relative_to(REPO).as_posix() for p in sources if p.stat().st_mtime > built]
    if newer:
        print(f"note: the installed kiln._native is older than {', '.join(sorted(newer)[:3])}{' ...' if len(newer) > 3 else ''}: "
              "the current side runs the extension as last built, not the working tree's csrc/")


def _show_imports(side: _Side, tmp: Path) -> None:
    """Print which kiln, build_rules and _native the side's processes import, and refuse a base run
    that would import the working tree."""
    proc = subprocess.run([sys.executable, "-c", WHICH], env=side.env, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_cold: the {side.name} side cannot import kiln:\n{proc.stderr[-2000:]}")
    paths = proc.stdout.split()
    print(f"{side.name:7s} imports kiln from {paths[0]}\n{'':7s} build_rules from {paths[1]}\n{'':7s} _native from {paths[2]}")
    if side.name == "base" and not all(Path(p).resolve().is_relative_to(side.tree.resolve()) for p in paths):
        sys.exit("bench_cold: the base run would import code outside the base checkout; refusing to compare")


def _workspace(side: _Side, spec: str, ws: Path) -> None:
    """The side's manifest (only the named target of it for "model:target") and its data."""
    model, _, target = spec.partition(":")
    manifests = ws / "manifests"
    manifests.mkdir(parents=True)
    text = (side.tree / "manifests" / f"{model}.toml").read_text()
    (manifests / f"{model}.toml").write_text(_only_target(text, target) if target else text)
    for folder in ("data", "models"):
        if (side.tree / "manifests" / folder).is_dir():
            shutil.copytree(side.tree / "manifests" / folder, manifests / folder)


def _only_target(text: str, target: str) -> str:
    """The manifest's text without the tables of other targets ([targets.x] and [targets.x.*])."""
    kept, keep = [], True
    for line in text.splitlines(keepends=True):
        header = line.strip()
        if header.startswith("[") and not header.startswith("[["):
            name = header.strip("[]").strip()
            keep = not name.startswith("targets.") or name.split(".")[1] == target
        elif header.startswith("[["):
            keep = True
        if keep:
            kept.append(line)
    return "".join(kept)


def _cold_build(side: _Side, spec: str, ws: Path, jobs: int | None, keep_hashes: bool) -> dict:
    _workspace(side, spec, ws)
    model = spec.partition(":")[0]
    env = {k: v for k, v in side.env.items() if k != "KILN_CACHE_DIR"} | {"KILN_CACHE": "off", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "kiln.cli", "--root", str(ws), "build", model, *(["-n", str(jobs)] if jobs else [])]
    log = ws.parent / f"{ws.name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(argv, env=env, cwd=ws, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    load = os.getloadavg()[1]  # 5-minute load average: above the build's own ~1-2, others shared the cores
    report = ws / "build" / model / "report.json"
    steps = json.loads(report.read_text())["steps"] if report.exists() else []
    run = {"ok": rc == 0, "wall": wall, "steps": sum(s.get("last_run_seconds") or 0 for s in steps),
           "ran": sum(s.get("status") == "ran" for s in steps), "load": load, "by_rule": {}}
    for s in steps:
        count, seconds = run["by_rule"].get(s["rule"], (0, 0.0))
        run["by_rule"][s["rule"]] = (count + 1, seconds + (s.get("last_run_seconds") or 0))
    if rc != 0:
        print(f"  {model} {side.name}: kiln build exited {rc}; last lines of its log:\n    "
              + "\n    ".join(log.read_text(errors="replace").splitlines()[-15:]))
    if keep_hashes:
        run["hashes"] = _artifact_hashes(ws, model) if rc == 0 else None
    shutil.rmtree(ws, ignore_errors=True)  # a bert build is ~640 MB: keep only its numbers and digests
    return run


def _artifact_hashes(ws: Path, model: str) -> dict[str, str]:
    """sha256 of every file of every artifact the lockfile lists (a folder artifact file by file),
    by workspace-relative path. Reports, lockfiles, validation.json and provenance (timings, dates)
    are not artifacts."""
    lock = json.loads((ws / "build" / model / "kiln.lock.json").read_text())
    digests = {}
    for artifact in lock["artifacts"]:
        path = ws / artifact["path"]
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digests[file.relative_to(ws).as_posix()] = _sha256(file)
    return digests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _ratio(new: float, old: float) -> str:
    return f"{new / old:5.2f}x" if old else "   - "


def _print_table(results: dict[tuple[str, str], list[dict]], args) -> None:
    print(f"\ncold builds, KILN_CACHE=off, jobs={args.jobs or 'default'}, {args.repeat} run(s) per side (medians); ratio = current / base")
    width = max(8, *(len(m) for m in args.models))
    print(f"{'model':{width}s} | {'base wall':>9s} {'steps':>7s} | {'current wall':>12s} {'steps':>7s} | {'wall ratio':>10s} {'steps ratio':>11s}")
    for model in args.models:
        base, cur = results[(model, "base")], results[(model, "current")]
        bw, bs = statistics.median(r["wall"] for r in base), statistics.median(r["steps"] for r in base)
        cw, cs = statistics.median(r["wall"] for r in cur), statistics.median(r["steps"] for r in cur)
        failed = "" if all(r["ok"] for r in base + cur) else "  (a build FAILED)"
        print(f"{model:{width}s} | {bw:9.1f} {bs:7.1f} | {cw:12.1f} {cs:7.1f} | {_ratio(cw, bw):>10s} {_ratio(cs, bs):>11s}{failed}")
    for model in args.models:
        base_rules, cur_rules = results[(model, "base")][0]["by_rule"], results[(model, "current")][0]["by_rule"]
        print(f"\n{model}: step seconds by rule (first run)\n{'rule':22s} | {'base n':>6s} {'s':>7s} | {'current n':>9s} {'s':>7s} | {'ratio':>6s}")
        for rule in sorted(set(base_rules) | set(cur_rules), key=lambda r: -max(base_rules.get(r, (0, 0))[1], cur_rules.get(r, (0, 0))[1])):
            bn, bsec = base_rules.get(rule, (0, 0.0))
            cn, csec = cur_rules.get(rule, (0, 0.0))
            print(f"{rule:22s} | {bn:6d} {bsec:7.1f} | {cn:9d} {csec:7.1f} | {_ratio(csec, bsec):>6s}")


def _compare_artifacts(hashes: dict, models: list[str]) -> int:
    """Name every artifact file that differs or exists on one side only; 1 when any does."""
    print()
    differ = 0
    for model in models:
        base, cur = hashes.get((model, "base")), hashes.get((model, "current"))
        if base is None or cur is None:
            print(f"{model}: artifacts not compared (a build failed)")
            differ = 1
            continue
        only_base, only_cur = sorted(set(base) - set(cur)), sorted(set(cur) - set(base))
        changed = sorted(p for p in set(base) & set(cur) if base[p] != cur[p])
        if not (only_base or only_cur or changed):
            print(f"{model}: artifacts byte-identical ({len(cur)} files)")
            continue
        differ = 1
        print(f"{model}: artifacts DIFFER: {len(changed)} changed, {len(only_base)} only in base, {len(only_cur)} only in current")
        for label, paths in (("changed", changed), ("only in base", only_base), ("only in current", only_cur)):
            for path in paths:
                print(f"  {label}: {path}")
    return differ


if __name__ == "__main__":
    sys.exit(main())
