"""A synthetic monorepo, built with kiln's up-to-date checks and with doit's MD5 file_dep checker.

    python benchmarks/bench_monorepo.py [--manifests 200] [--hidden 64] [--jobs 2] [--repeat 3] [--keep DIR]

Generates N manifests (default 200), each with its own small ONNX source (an MLP with seeded
weights, 32 -> hidden -> 16; --hidden 64 by default) and five targets: onnx fp32 (onnxsim), fp32 without onnxsim, fp16, int8
(dynamic) and int4: 10 steps a manifest, 2000 for 200. Then times, every time as the wall clock of a
fresh `python -m doit` process (interpreter start included):

  cold          first build (kiln; -n jobs)
  no-op         nothing changed
  touch 1st     every source and data file touched (mtime and ctime change, bytes do not): first build
  touch 2nd     the build after that (kiln refreshed its digest cache; doit issue #431: MD5 re-hashes again)
  edit one      one manifest's fp16 target changed (keep_fp32_ops): only its steps may run

three times: with kiln's checks (its dodo: unchanged manifests are not even planned, kiln.fresh);
with kiln's checks and every manifest planned and handed to doit (KILN_FRESH=off); and with doit's
default MD5 checker over the same tasks (each task gets file_dep = its inputs and targets = its
outputs, no uptodate; same sqlite3 backend, its own dep file). The MD5 side starts from the cold kiln build's outputs and its own first run, so
its cold build is kiln's cache restoring every step, not a comparison. Prints one table and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MANIFEST = '''[model]
name = "m{index:03d}"

[source]
kind = "onnx"
path = "models/m{index:03d}.onnx"

[[inputs]]
name = "x"
shape = ["batch", 32]

[[outputs]]
name = "y"
shape = ["batch", 16]

[targets.fp32]
format = "onnx"

[targets.raw]
format = "onnx"
options = {{ simplify = false }}

[targets.fp16]
format = "onnx"
precision = "fp16"

[targets.int8]
format = "onnx"
precision = "int8"
# random weights and inputs: the worst row's cosine under int8 activations is ~0.89 on some seeds
thresholds = {{ min_cosine = 0.8 }}

[targets.int4]
format = "onnx"
precision = "int4"

[validation]
data = "data/x.npz"
batch_size = 32
'''

MD5_DODO = '''
"""The same tasks as kiln's dodo.py, decided by doit's own MD5 file_dep checker."""
from pathlib import Path
from doit.tools import config_changed
from kiln.engine import doit_globals
from kiln.base.hashing import canonical_json

_kiln = doit_globals(Path(__file__).parent, skip_unchanged=False)  # doit's checker sees every task
DOIT_CONFIG = dict(_kiln["DOIT_CONFIG"], dep_file=str(Path(__file__).parent / "build/.kiln/doit-md5.db"))

def task_build():
    for task in _kiln["task_build"]():
        task = dict(task)
        step = task["actions"][0][1][0]
        task["uptodate"] = [config_changed(canonical_json([step.rule, step.params]))]  # a changed parameter reruns
        task["file_dep"] = [str(p) for files in step.inputs.values() for p in files]
        yield task
'''


def make_model(path: Path, seed: int, hidden: int = 64) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in (("W1", (32, hidden)), ("b1", (hidden,)), ("W2", (hidden, 16)), ("b2", (16,)))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def generate(root: Path, count: int, hidden: int = 64) -> list[Path]:
    """The workspace: dodo.py, manifests/m###.toml, manifests/models/m###.onnx, manifests/data/x.npz."""
    import numpy as np

    (root / "manifests/models").mkdir(parents=True)
    (root / "manifests/data").mkdir()
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    (root / "dodo_md5.py").write_text(MD5_DODO)
    np.savez(root / "manifests/data/x.npz", x=np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))
    inputs = [root / "manifests/data/x.npz"]
    for index in range(count):
        make_model(root / f"manifests/models/m{index:03d}.onnx", index, hidden)
        (root / f"manifests/m{index:03d}.toml").write_text(MANIFEST.format(index=index))
        inputs.append(root / f"manifests/models/m{index:03d}.onnx")
    return inputs


def doit(root: Path, dodo: str, jobs: int = 1, env: dict[str, str] | None = None) -> tuple[float, int]:
    """(seconds, tasks executed) of one `python -m doit build` in a fresh process."""
    extra = ["-n", str(jobs)] if jobs > 1 else []
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", dodo, *extra, "build"], cwd=root, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"doit -f {dodo} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds, sum(line.startswith(".  ") for line in proc.stdout.splitlines())


def touch(paths: list[Path]) -> None:
    now = time.time_ns()
    for path in paths:
        os.utime(path, ns=(now, now))


def edit_one(root: Path, value: str) -> None:
    manifest = root / "manifests/m001.toml"
    text = manifest.read_text()
    head, _, tail = text.partition('precision = "fp16"\n')
    tail = tail.split("\n", 1)[1] if tail.startswith("options") else tail
    manifest.write_text(head + 'precision = "fp16"\n' + f"options = {{ keep_fp32_ops = [{value}] }}\n" + tail)


def scenario(root: Path, inputs: list[Path], dodo: str, edit_value: str, repeat: int, env: dict[str, str] | None = None) -> dict[str, tuple[float, int]]:
    """Each scenario's median over `repeat` runs (a touch before each pair of touch runs); one edit."""
    def median(runs: list[tuple[float, int]]) -> tuple[float, int]:
        return sorted(runs)[len(runs) // 2]

    results = {"no-op": median([doit(root, dodo, env=env) for _ in range(repeat)])}
    firsts, seconds = [], []
    for _ in range(repeat):
        touch(inputs)
        firsts.append(doit(root, dodo, env=env))
        seconds.append(doit(root, dodo, env=env))
    results["touch 1st"], results["touch 2nd"] = median(firsts), median(seconds)
    edit_one(root, edit_value)
    results["edit one"] = doit(root, dodo, env=env)
    results["no-op again"] = median([doit(root, dodo, env=env) for _ in range(repeat)])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifests", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="hidden width of each MLP: 64 gives 13 KB models, 8192 about 1.1 MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (the median is printed)")
    parser.add_argument("--keep", type=Path, help="build the monorepo here and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="kiln-monorepo-"))
    inputs = generate(root, args.manifests, args.hidden)
    steps = 10 * args.manifests
    cold = doit(root, "dodo.py", args.jobs)
    source_mb = sum(p.stat().st_size for p in inputs) / 1e6
    print(f"{args.manifests} manifests, {steps} steps, {source_mb:.1f} MB of sources and data; cold build with -n {args.jobs}: {cold[0]:.1f} s ({cold[1]} tasks ran)")
    kiln = scenario(root, inputs, "dodo.py", '"Relu"', args.repeat)
    # the same checks with every manifest planned and handed to doit (kiln.fresh turned off)
    planned = scenario(root, inputs, "dodo.py", '"Gemm"', args.repeat, env={"KILN_FRESH": "off"})
    md5_first = doit(root, "dodo_md5.py")  # doit has no MD5 records yet: every task runs (kiln's cache restores it)
    md5 = scenario(root, inputs, "dodo_md5.py", '"Relu", "Gemm"', args.repeat)
    print(f"(MD5 side's first run, every task through kiln's cache: {md5_first[0]:.1f} s, {md5_first[1]} tasks)")
    print(f"(medians of {args.repeat} runs, each a fresh `python -m doit` process; 'edit one' is one run)")
    print("\n| scenario | kiln s (tasks run) | kiln, every manifest planned | doit MD5 s (tasks run) | MD5 / kiln |\n| --- | --- | --- | --- | --- |")
    for name in kiln:
        (k, kn), (p, pn), (m, mn) = kiln[name], planned[name], md5[name]
        print(f"| {name} | {k:.2f} ({kn}) | {p:.2f} ({pn}) | {m:.2f} ({mn}) | {m / k:.1f}x |")
    print(json.dumps({"manifests": args.manifests, "steps": steps, "cold_s": round(cold[0], 2), "repeat": args.repeat,
                      "kiln": {k: round(v[0], 3) for k, v in kiln.items()},
                      "kiln_every_manifest_planned": {k: round(v[0], 3) for k, v in planned.items()},
                      "md5": {k: round(v[0], 3) for k, v in md5.items()}}))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
