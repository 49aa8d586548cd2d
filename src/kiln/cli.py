"""The `kiln` command: schema, check, plan, explain, build. Expected errors print one line and exit
non-zero (2: bad manifest or input; 1: a step failed, its traceback in the step's log); anything
else is a bug with a traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from kiln.errors import KilnError, UsageError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KilnError as err:
        print(f"kiln: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # `kiln explain ... | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0


def run() -> None:
    """The console script: main(), then exit without the interpreter's teardown (a second or more
    once torch is loaded: kiln.base.exiting). main() itself returns, for callers in-process."""
    from kiln.base.exiting import exit_without_teardown

    exit_without_teardown(main())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Declarative, incremental, validated builds of ML model artifacts.")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="workspace root (holds manifests/ and build/); default: the current folder")
    sub = parser.add_subparsers(required=True, metavar="command")

    schema = sub.add_parser("schema", help="print the manifest JSON Schema")
    schema.set_defaults(func=_schema)

    check = sub.add_parser("check", help="validate manifests (and their files) without building")
    check.add_argument("manifests", nargs="*", help="paths or bare names in manifests/; default: all")
    check.set_defaults(func=_check)

    explain = sub.add_parser("explain", help="list the steps a build would run, and why")
    explain.add_argument("manifest")
    explain.add_argument("target", nargs="?", help="only steps this target needs")
    explain.set_defaults(func=_explain)

    verify = sub.add_parser("verify", help="re-hash the artifacts against their lockfiles and provenance; exit 1 on any drift")
    verify.add_argument("manifests", nargs="*", help="paths or bare names in manifests/; default: all")
    verify.set_defaults(func=_verify)

    init = sub.add_parser("init", help="write a commented manifest for a model (Hugging Face folder, ONNX, SavedModel, tree or sklearn file)")
    init.add_argument("path", type=Path, help="the model: a folder or a file")
    init.add_argument("-o", "--output", type=Path, help="manifest to write; default: manifests/<name>.toml")
    init.add_argument("--name", help="[model] name; default: from the file or folder name")
    init.add_argument("--allow-pickle", action="store_true", help="read a pickled scikit-learn model (unpickling can run code)")
    init.set_defaults(func=_init)

    diff = sub.add_parser("diff", help="compare two builds' reports/lockfiles per target; exit 1 when a --fail-on gate got worse")
    diff.add_argument("builds", nargs="*", metavar="build", help="report.json, kiln.lock.json or build folder (or model name); default: every build/<model>/")
    diff.add_argument("--against", metavar="GIT_REF", help="compare with the same files as committed at GIT_REF")
    diff.add_argument("--fail-on", action="append", default=[], metavar="METRIC=DELTA", help="fail when METRIC got worse by more than DELTA (or DELTA%%), e.g. min_cosine=0.001")
    diff.set_defaults(func=_diff)

    cache = sub.add_parser("cache", help="the local content-addressed cache of step outputs (.kiln/cache)")
    cache_sub = cache.add_subparsers(required=True, metavar="action")
    info = cache_sub.add_parser("info", help="entries, objects and bytes in the cache")
    info.set_defaults(func=_cache_info)
    gc = cache_sub.add_parser("gc", help="drop least recently used entries until the cache fits")
    gc.add_argument("--max-size", required=True, help="e.g. 500M, 2G, or bytes")
    gc.set_defaults(func=_cache_gc)

    build = sub.add_parser("build", help="build manifests (same as `doit build manifest=...`)")
    build.add_argument("manifests", nargs="*", help="paths or bare names in manifests/; default: all")
    build.add_argument("-n", "--jobs", type=int, help="steps run side by side (default: env KILN_JOBS, else the cores, at most 4)")
    loudness = build.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="print only errors and the summary")
    loudness.add_argument("-v", "--verbose", action="store_true", help="also print why each step ran (or was up to date)")
    build.add_argument("--executor", choices=("local", "ray"), help="where steps that miss the caches run: here (local, the default) "
                       "or on a Ray cluster (ray; needs a remote cache: docs/remote-execution.md); env KILN_EXECUTOR")
    build.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster (host:port); default: start one here (local); env KILN_RAY_ADDRESS")
    build.set_defaults(func=_build)

    worker = sub.add_parser("worker", help="join this machine to a kiln Ray cluster, labelled with its GPU (docs/remote-execution.md)")
    worker.add_argument("--address", required=True, metavar="HEAD", help="the head node's Ray address (host:port)")
    worker.add_argument("--num-cpus", type=int, help="CPUs this node offers; default: all")
    worker.add_argument("--dry-run", action="store_true", help="print the `ray start` command, do not run it")
    worker.set_defaults(func=_worker)
    return parser


def _schema(args) -> int:
    from kiln.define.spec import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def _plans(args, names):
    from kiln.plan.load import load_plans
    from kiln.schema.names import manifest_for

    root = args.root.resolve()
    paths = [str(manifest_for(name, root)) for name in names]  # a [model] name works as well as a file name
    return load_plans(root, ",".join(paths) if paths else None)


def _check(args) -> int:
    for plan in _plans(args, args.manifests):
        skipped = "".join(f"; skipped {target}: {why}" for target, why in sorted(plan.skipped.items()))
        print(f"{plan.manifest}: ok: model {plan.model}, {len(plan.steps)} steps, artifacts: " + ", ".join(str(p.relative_to(plan.root)) for _, p in plan.artifacts()) + skipped)
    return 0


def _explain(args) -> int:
    from kiln.state.uptodate import why

    (plan,) = _plans(args, [args.manifest])
    steps = [s for s in plan.steps if args.target is None or args.target in s.targets]
    if args.target and not steps:
        print(f"kiln: error: {plan.manifest}: targets.{args.target}: no such target; targets: {sorted({t for s in plan.steps for t in s.targets})}", file=sys.stderr)
        return 2
    for step in steps:
        reason = why(step, plan.root)
        print(f"{'run ' if reason else 'ok  '} {step.name}: {reason or 'up to date'}")
    return 0


def _verify(args) -> int:
    from kiln.base.paths import relative
    from kiln.state.lockfile import lock_path, verify

    drifted = 0
    for plan in _plans(args, args.manifests):
        if not plan.steps and plan.skipped:  # every target needs hardware this machine lacks: nothing was built here
            print(f"{relative(plan.manifest, plan.root)}: skipped: {len(plan.skipped)} targets cannot be built on this machine")
            continue
        problems = verify(plan)
        drifted += bool(problems)
        for line in problems:
            print(f"kiln: drift: {line}", file=sys.stderr)
        if not problems:
            print(f"{lock_path(plan).relative_to(plan.root)}: ok: {len(plan.artifacts())} artifacts match")
    return 1 if drifted else 0


def _init(args) -> int:
    from kiln.define.scaffold import scaffold

    written = scaffold(args.path, args.root.resolve(), args.output, args.name, args.allow_pickle)
    for path in written:
        print(f"wrote {path}")
    return 0


def _diff(args) -> int:
    from kiln.state.diff import diff_text, parse_gate, sides

    gates = [parse_gate(text) for text in args.fail_on]
    lines, failures = diff_text(sides(args.builds, args.against, args.root.resolve()), gates)
    print("\n".join(lines))
    for failure in failures:
        print(f"kiln: regression: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _open_cache(args):
    from kiln.state.cache import Cache

    cache = Cache.for_root(args.root.resolve())
    if cache is None:
        raise UsageError("KILN_CACHE", "the cache is turned off (KILN_CACHE=off)")
    return cache


def _cache_info(args) -> int:
    cache = _open_cache(args)
    stats = cache.stats()
    print(f"{cache.folder}: {stats['entries']} step entries, {stats['objects']} objects, {stats['bytes'] / (1 << 20):.1f} MiB")
    return 0


def _cache_gc(args) -> int:
    from kiln.state.cache import parse_size

    try:
        limit = parse_size(args.max_size)
    except ValueError as err:
        raise UsageError("--max-size", str(err)) from None
    cache = _open_cache(args)
    done = cache.gc(limit)
    print(f"{cache.folder}: removed {done['entries_removed']} entries and {done['objects_removed']} objects "
          f"({done['bytes_freed'] / (1 << 20):.1f} MiB); {done['bytes_kept'] / (1 << 20):.1f} MiB kept")
    return 0


def _build(args) -> int:
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    from kiln.engine import doit_globals

    names = ",".join(args.manifests) if args.manifests else ""
    from kiln.engine.progress import NORMAL, QUIET, VERBOSE

    verbosity = QUIET if args.quiet else VERBOSE if args.verbose else NORMAL
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs", f"{args.jobs}: expected 1 or more parallel steps")
    extra = ["-n", str(args.jobs)] if args.jobs is not None else []  # else DOIT_CONFIG's default (kiln.engine.tasks)
    with _executor_settings(args):  # planned under it: a Ray build's GPU facts are the cluster's
        namespace = doit_globals(args.root, names, skip_unchanged=True, verbosity=verbosity)  # a plain build: unchanged manifests are not planned
        return DoitMain(ModuleTaskLoader(namespace)).run([*extra, "build"])  # doit options go before the task name


@contextlib.contextmanager
def _executor_settings(args):
    """--executor / --ray-address as KILN_EXECUTOR / KILN_RAY_ADDRESS for the build's steps (restored
    afterwards: main() may run in-process); a Ray build is checked first and disconnected after."""
    from kiln.execute import ray_executor

    wanted = {ray_executor.ENV_EXECUTOR: args.executor, ray_executor.ENV_ADDRESS: args.ray_address}
    before = {name: os.environ.get(name) for name in wanted}
    os.environ.update({name: value for name, value in wanted.items() if value is not None})
    try:
        if ray_executor.executor() == "ray":
            ray_executor.check_usable(args.root.resolve())
        yield
    finally:
        ray_executor.shutdown()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker(args) -> int:
    from kiln.execute.ray_executor import start_worker

    return start_worker(args.address, args.num_cpus, args.dry_run)


if __name__ == "__main__":
    run()
