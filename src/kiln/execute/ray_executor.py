"""Running a step on a Ray cluster instead of in this process (`kiln build --executor ray`,
KILN_EXECUTOR=ray). doit stays the planner on the head; only a step that missed both caches comes
here (kiln.execute.step._run), and it comes back as if the remote cache had had it.

What travels where:
- The head makes sure the step's inputs are in the remote cache's CAS (HEAD each object, PUT the
  missing ones), then submits a small JSON-able spec through Ray's object store: rule, params, inputs
  {role: [{path (workspace-relative), sha256, bytes[, files]}]}, outputs {role: relative path}, the
  expected key and the key's components (tool versions, hardware facts).
- The worker checks that its own rule version, tool versions and hardware facts equal the spec's
  (else it fails naming both sides), fetches the inputs from CAS into a private scratch workspace at
  the same relative paths (each streamed to a temp file, its sha256 and size checked), runs the rule
  exactly as a local build does (kiln.execute.step._execute: temp files renamed into place, the
  step's log), uploads the outputs and then the entry to the remote cache, and returns the small
  entry plus its log. Model bytes never go through Ray's object store.
- The head restores the outputs from the remote cache like any remote hit (kiln.state.cache_tiers:
  verified before anything is renamed into the workspace).

Routing: every step asks for 1 CPU and `memory=` its reservation (the rule's declared memory, or
more once a run measured more: kiln.execute.resources.reservation_mib). A step whose hardware facts
name a GPU (compute_capability: TensorRT engines) also asks for `num_gpus=1` and a label_selector on
the labels `kiln worker` gives a GPU node (node_labels: GPU, compute capability, driver, TensorRT
version), so it lands where its key says it was built; a step that runs a TensorRT engine (the
TensorRT validate) goes to the same GPU kind. Those facts are the cluster's, not the head's: see
"GPU facts for keys" below (one GPU pool, or the one KILN_RAY_GPU names). Rules using torch run in a
fresh worker process each time (max_calls=1): torch.onnx.export leaves process-global state behind.

Failure: a step no live node could take (resources or labels nobody has) fails after
KILN_RAY_TIMEOUT seconds (default 60) naming what it asked for, instead of pending forever. A node
that dies mid-step is retried KILN_RAY_RETRIES times (default 1) on another node that fits; after
that the step fails with Ray's reason. The worker uploads the entry last, so a step that died
mid-way published nothing, and nothing reaches the head's workspace unless the whole entry
restored: a rerun runs the step again.

Ray is imported only when a step is sent (`pip install 'kiln[ray]'`). Connecting happens lazily in
the process that runs the step (a process that connected to Ray must not fork: doit's -n forks).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kiln.base.cuda import CudaUnavailable, device_facts, probe_source, set_probe_source
from kiln.base.fsio import write_bytes_atomic
from kiln.base.hashing import is_empty_folder
from kiln.base.paths import workspace_path
from kiln.base.temps import temp_path
from kiln.base.tools import tool_version, tool_versions
from kiln.errors import KilnError, UsageError, one_line
from kiln.execute.resources import Meter, metered, reservation_mib
from kiln.plan.steps import Step
from kiln.state.cache import Cache
from kiln.state.cache_tiers import CacheTiers
from kiln.state.records import failure_path, log_path
from kiln.state.remote_cache import RemoteCache, RemoteUnavailable
from kiln.state.remote_config import remote_config
from kiln.state.uptodate import step_key

ENV_EXECUTOR = "KILN_EXECUTOR"  # "local" (default) or "ray"
ENV_ADDRESS = "KILN_RAY_ADDRESS"  # a running cluster (host:port, ray://...), or "local" (default): start one here
ENV_TIMEOUT = "KILN_RAY_TIMEOUT"  # seconds a step may wait while no live node can take it
ENV_RETRIES = "KILN_RAY_RETRIES"  # how often Ray reruns a step whose worker or node died
ENV_SCRATCH = "KILN_RAY_SCRATCH"  # where workers make their private scratch workspaces (default: the temp folder)
ENV_GPU = "KILN_RAY_GPU"  # which GPU pool TensorRT steps are built for when the cluster has several (a kiln-gpu or kiln-cuda-cc value)
EXECUTORS = ("local", "ray")
DEFAULT_ADDRESS = "local"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 1
SPEC_FORMAT = 1
LOG_LIMIT = 256 << 10  # bytes of a worker's step log sent back (its tail): the object store carries only small things
POLL_S = 1.0
INSTALL = "pip install 'kiln[ray]'"

# Node labels `kiln worker` sets from kiln.base.cuda.device_facts, and GPU steps select on: a key's
# hardware fact -> label name.
LABELS = {"gpu": "kiln-gpu", "compute_capability": "kiln-cuda-cc", "cuda_driver": "kiln-cuda-driver", "tensorrt": "kiln-tensorrt"}
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]+")
# A fact whose label value lost something (a GPU name's spaces) is also advertised exactly, base32 in
# the label <label>-b32: the head's step keys hold a GPU pool's exact facts (use_cluster_gpu_facts),
# the same facts a local build on that GPU puts in its keys, so the two share cache entries.
EXACT_SUFFIX = "-b32"
INT_FACTS = ("cuda_driver",)  # device_facts gives these as integers
NODES_TIMEOUT_S = 120  # the subprocess that reads the cluster's nodes (imports ray, connects)

# Safe defaults for Ray on a laptop or CI runner (docs: DISTRIBUTED.md's traps): no usage report
# sent home, and a cluster started here listens on loopback without writing an auth token to ~/.ray.
RAY_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}
LOCAL_RAY_DEFAULTS = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


# ---- settings ------------------------------------------------------------------------------------

def executor() -> str:
    """The executor KILN_EXECUTOR names ("local" when unset)."""
    value = os.environ.get(ENV_EXECUTOR, "").strip().lower() or "local"
    if value not in EXECUTORS:
        raise UsageError(ENV_EXECUTOR, f"{os.environ[ENV_EXECUTOR]!r} is not an executor; allowed: {', '.join(EXECUTORS)}")
    return value


def active() -> bool:
    """Whether steps that miss the caches go to a Ray cluster (cheap: imports nothing)."""
    return os.environ.get(ENV_EXECUTOR, "").strip().lower() == "ray"


def address() -> str:
    return os.environ.get(ENV_ADDRESS, "").strip() or DEFAULT_ADDRESS


def timeout_s() -> float:
    return _number(ENV_TIMEOUT, DEFAULT_TIMEOUT_S, "a number of seconds above 0, e.g. 60")


def retries() -> int:
    value = _number(ENV_RETRIES, DEFAULT_RETRIES, "a whole number >= 0, e.g. 1", allow_zero=True)
    if value != int(value):
        raise UsageError(ENV_RETRIES, f"{os.environ[ENV_RETRIES]!r} is not allowed; expected a whole number >= 0, e.g. 1")
    return int(value)


def _number(variable: str, default: float, expected: str, allow_zero: bool = False) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise UsageError(variable, f"{text!r} is not allowed; expected {expected}")
    return value


def check_usable(root: Path) -> None:
    """What `kiln build --executor ray` checks before planning: Ray is installed and a remote cache
    is configured (inputs and outputs travel through it). Raises UsageError with one line."""
    import importlib.util


    executor()
    timeout_s()
    retries()
    if importlib.util.find_spec("ray") is None:
        raise UsageError("--executor ray", f"the ray package is not installed ({INSTALL})")
    if remote_config(root) is None:
        raise UsageError("--executor ray", "needs a remote cache, since steps' inputs and outputs travel through it: "
                                           "set KILN_REMOTE_CACHE=http://host:port (or url in kiln.toml [remote_cache])")


# ---- connecting (lazily, once per process) -------------------------------------------------------

_connected: dict[str, Any] = {}  # "pid" -> the process that connected, "started" -> whether it started the cluster
_connect_lock = threading.Lock()


def connect():
    """The ray module, connected to the cluster of KILN_RAY_ADDRESS (a caller that connected already,
    such as a test's cluster, is used as it is). Once per process, after any fork."""
    for name, value in RAY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    where = address()
    if where == "local":
        for name, value in LOCAL_RAY_DEFAULTS.items():
            os.environ.setdefault(name, value)
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray", f"the ray package is not installed ({INSTALL})") from None
    with _connect_lock:
        if ray.is_initialized():
            return ray
        started = where == "local"
        options: dict[str, Any] = {"address": where, "log_to_driver": False, "logging_level": "WARNING"}
        if started:
            options["include_dashboard"] = False
        import logging

        # doit -P thread connects from a worker thread, where Ray cannot install its SIGTERM handler and
        # says so on every build: harmless here (the head's main thread still handles signals)
        logging.getLogger("ray._private.worker").addFilter(lambda record: "SIGTERM handler is not set" not in record.getMessage())
        try:
            ray.init(**options)
        except Exception as err:  # ConnectionError, a version mismatch between head and cluster, ...
            raise UsageError(ENV_ADDRESS, f"cannot connect to the Ray cluster at {where!r}: {one_line(err)[:300]}") from None
        _connected.update(pid=os.getpid(), started=started)
    return ray


def shutdown() -> None:
    """Disconnect (and stop the cluster this process started with address "local"). Called by the CLI
    once a build is over; a no-op when this process never connected. Step keys' GPU facts are this
    machine's again."""
    use_cluster_gpu_facts(False)
    if _connected.get("pid") != os.getpid():
        return
    import ray

    ray.shutdown()
    _connected.clear()


# ---- GPU facts for keys: the cluster's GPU pool -------------------------------------------------
#
# A TensorRT step's key holds the facts of the GPU it is built on (build_tensorrt.hardware_for ->
# kiln.base.cuda.device_facts), and the step is routed to nodes labelled with those facts. Under the
# Ray executor the head usually has no GPU at all, so those facts come from the cluster instead: the
# alive nodes' kiln labels (set by `kiln worker` from its own device_facts), grouped into pools of
# identical labels. One pool: its facts. Several: KILN_RAY_GPU picks one. None: one line saying so.
#
# Exactness: the labels are sanitized for Ray (label_value), so node_labels also writes the exact
# text of a fact that lost characters (<label>-b32) and facts_from_labels reads it back. The keys then
# hold exactly what device_facts gives on that GPU, so (a) the worker's own check
# (check_worker: rule.hardware_for on the worker == the key's) compares like with like, with no
# second "label form" of the facts to keep in step, and (b) a Ray build and a local build on the same
# GPU kind make the same keys and share cache entries. The hook is kiln.base.cuda.set_probe_source
# (kiln.base cannot import kiln.execute); kiln.engine.tasks installs it when it makes the tasks.


class ClusterGpuPool:
    """kiln.base.cuda's probe source under the Ray executor: a probe-shaped answer made from the
    cluster's GPU pool, read once (failures too, so each step key does not ask again)."""

    def __init__(self, where: str):
        self.where = where
        self._lock = threading.Lock()
        self._answer: tuple[dict[str, Any] | None, str | None] | None = None

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            if self._answer is None:
                try:
                    self._answer = probe_answer(choose_pool(alive_nodes(self.where), os.environ.get(ENV_GPU, "").strip())), None
                except CudaUnavailable as err:
                    self._answer = None, str(err)
                except Exception as err:  # Ray itself failing (the cluster went away...): still one line, in the keys
                    self._answer = None, f"cannot read the GPU nodes of the Ray cluster at {self.where!r}: {type(err).__name__}: {one_line(err)[:300]}"
        found, failure = self._answer
        if failure is not None:
            raise CudaUnavailable(failure)
        assert found is not None
        return found


def use_cluster_gpu_facts(on: bool = True) -> None:
    """on: step keys' GPU facts (and the TensorRT version in keys, and planning's "is there a GPU for
    this target") come from the cluster's GPU pool from now on, read lazily when the first one is
    asked for; off: from this machine again. With the address "local" the cluster is this machine,
    so its own facts stand. Cheap: connects to nothing."""
    current = probe_source()
    if on and address() != "local":
        if isinstance(current, ClusterGpuPool) and current.where == address():
            return  # keep what was read: one build, one pool
        set_probe_source(ClusterGpuPool(address()))
    elif current is None:
        return
    else:
        set_probe_source(None)
    tool_version.cache_clear()  # the TensorRT version came from the other source


# Runs in a subprocess: prints the cluster's nodes (what ray.nodes() says) as one JSON line.
NODES_MARKER = "KILN-RAY-NODES "
NODES_SCRIPT = r"""
import json, sys
if sys.path and sys.path[0] == "":
    del sys.path[0]  # `python -c` puts the working directory first: a ray.py there must not shadow the install
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes = [{k: n.get(k) for k in ("NodeID", "Alive", "Labels", "Resources")} for n in ray.nodes()]
print("KILN-RAY-NODES " + json.dumps(nodes), flush=True)
"""


def alive_nodes(where: str) -> list[dict[str, Any]]:
    """The cluster's alive nodes (ray.nodes()). From this process when it is connected already (a
    thread-mode build after its first step, a test); else from a short-lived subprocess, since this is
    asked while planning, in doit's parent process, and `doit -n N` in process mode forks its workers
    after planning: a process connected to Ray must not fork. Raises CudaUnavailable with one line."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)() and _connected.get("pid", os.getpid()) == os.getpid():
        return [n for n in ray.nodes() if n.get("Alive")]
    what = f"cannot read the nodes of the Ray cluster at {where!r} ({ENV_ADDRESS})"
    try:
        done = subprocess.run([sys.executable, "-c", NODES_SCRIPT, where], capture_output=True, text=True, errors="replace",
                              timeout=NODES_TIMEOUT_S, env=os.environ | RAY_DEFAULTS)
    except subprocess.TimeoutExpired:
        raise CudaUnavailable(f"{what}: no answer within {NODES_TIMEOUT_S} s") from None
    except OSError as err:
        raise CudaUnavailable(f"{what}: {err}") from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(NODES_MARKER):
            return [n for n in json.loads(line[len(NODES_MARKER):]) if n.get("Alive")]
    said = " ".join((done.stderr.strip().splitlines() or ["no output"])[-1].split())[:300]
    raise CudaUnavailable(f"{what}: exit code {done.returncode}: {said}")


def gpu_pools(nodes: list[dict[str, Any]]) -> list[tuple[dict[str, str], int]]:
    """(kiln labels, how many nodes) per GPU pool: alive nodes labelled with a compute capability by
    `kiln worker`, grouped by identical kiln labels; sorted for stable messages."""
    pools: dict[tuple[tuple[str, str], ...], int] = {}
    for node in nodes:
        labels = node.get("Labels") or {}
        if node.get("Alive", True) and LABELS["compute_capability"] in labels:
            key = tuple(sorted((k, v) for k, v in labels.items() if k.startswith("kiln-")))
            pools[key] = pools.get(key, 0) + 1
    return [(dict(key), count) for key, count in sorted(pools.items())]


def describe_pool(labels: dict[str, str], count: int) -> str:
    shown = " ".join(f"{label}={labels[label]}" for label in LABELS.values() if label in labels)
    return f"{shown} ({count} node{'s' if count != 1 else ''})"


def choose_pool(nodes: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    """The device facts of the GPU pool TensorRT steps are built for: the only one, or the one
    KILN_RAY_GPU names (by its kiln-gpu or kiln-cuda-cc label, or the exact GPU name). Raises
    CudaUnavailable with one line listing the pools when that is not one pool."""
    nodes = [n for n in nodes if n.get("Alive", True)]
    pools = gpu_pools(nodes)
    if not pools:
        return _no_gpu_pool(nodes)
    listed = "; ".join(describe_pool(labels, count) for labels, count in pools)
    advice = f"set {ENV_GPU} to one pool's kiln-gpu or kiln-cuda-cc value"
    if not wanted:
        if len(pools) == 1:
            return facts_from_labels(pools[0][0])
        raise CudaUnavailable(f"the Ray cluster has {len(pools)} GPU pools (nodes with different kiln labels): {listed}; "
                              f"{advice} to pick the GPU TensorRT steps are built for")
    matches = [labels for labels, _ in pools
               if wanted in (labels.get(LABELS["gpu"]), labels.get(LABELS["compute_capability"]), facts_from_labels(labels)["gpu"])]
    if len(matches) == 1:
        return facts_from_labels(matches[0])
    if not matches:
        raise CudaUnavailable(f"{ENV_GPU}={wanted!r} names none of the Ray cluster's GPU pools: {listed}; {advice}")
    raise CudaUnavailable(f"{ENV_GPU}={wanted!r} matches {len(matches)} GPU pools: {listed}; set it to one pool's kiln-gpu value")


def _no_gpu_pool(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    unlabelled = sum(1 for n in nodes if (n.get("Resources") or {}).get("GPU"))
    also = f", {unlabelled} with GPUs but without kiln's labels (started by plain `ray start`)" if unlabelled else ""
    raise CudaUnavailable(f"the Ray cluster has no GPU node with kiln's labels ({len(nodes)} alive node{'s' if len(nodes) != 1 else ''}{also}): "
                          "start one with `kiln worker --address HEAD:PORT` on a machine with an NVIDIA GPU and TensorRT")


def probe_answer(facts: dict[str, Any]) -> dict[str, Any]:
    """A pool's facts in the shape of kiln.base.cuda's probe, whose device_facts then give them back."""
    found: dict[str, Any] = {"cuda_driver": facts.get("cuda_driver"),
                             "devices": [{"gpu": facts.get("gpu"), "compute_capability": facts.get("compute_capability")}]}
    if facts.get("tensorrt") is not None:
        found["tensorrt"] = facts["tensorrt"]
    else:
        found["tensorrt_error"] = "the Ray cluster's GPU pool advertises no kiln-tensorrt label"
    return found


# ---- the head: one step --------------------------------------------------------------------------

class RemoteStepFailed(Exception):
    """The step failed on (or could not reach) the cluster: str() is the one line; facts and log
    are the worker's, when it ran."""

    def __init__(self, line: str, facts: dict | None = None, log: str | None = None):
        super().__init__(line)
        self.facts = facts or {}
        self.log = log


def run_remote(step: Step, root: Path, key: str, current: dict[str, Any], tiers: CacheTiers | None, why: str,
               started: float, meter: Meter):
    """kiln.execute.step's stand-in for _execute under the Ray executor: send the step to the
    cluster, then restore its outputs from the remote cache. Returns the rule's facts, or the
    step's StepFailed (failure file written, the worker's log at the step's log path)."""
    from kiln.execute.step import _failed, _remember_output

    log = log_path(root, step)
    try:
        result = send(step, root, key, current, tiers)
    except (RemoteStepFailed, KilnError) as err:
        text = getattr(err, "log", None)
        if text is not None:
            _write_log(log, text)
        facts = getattr(err, "facts", {})
        return _failed(step, root, why, f"{step.name}: {err}", started, meter, facts, log if text is not None else None)
    except Exception as err:  # Ray itself failing (the cluster went away mid-build...): the step fails, the build goes on
        return _failed(step, root, why, f"{step.name}: the Ray executor failed: {type(err).__name__}: {one_line(err)[:400]}", started, meter)
    _write_log(log, f"kiln: ran on the Ray node {result.get('node') or '?'} ({result.get('host')})\n" + (result.get("log") or ""))
    for role, path in step.outputs.items():  # just verified while restored: no need to hash them again
        _remember_output(root, path, result["entry"]["outputs"][role])
    return result["entry"]["info"]


def send(step: Step, root: Path, key: str, current: dict[str, Any], tiers: CacheTiers | None) -> dict[str, Any]:
    """Inputs to CAS, the step to the cluster, its outputs back through the remote cache.
    Returns the worker's result (entry, log, node); raises RemoteStepFailed or KilnError."""
    if tiers is None or tiers.remote is None:
        raise UsageError("--executor ray", "needs the local cache on and a remote cache: set KILN_REMOTE_CACHE=http://host:port "
                                           "(steps' inputs and outputs travel through it) and leave KILN_CACHE on")
    if tiers.down is not None:
        raise RemoteStepFailed(f"cannot send it to the Ray cluster: the remote cache {tiers.remote.url} is unreachable ({tiers.down})")
    hardware = current.get("hardware")
    if isinstance(hardware, dict) and "unavailable" in hardware:  # no GPU to route it to: say why, before anything moves
        raise RemoteStepFailed(f"cannot send it to a GPU node: {hardware['unavailable']}")
    spec = make_spec(step, root, key, current)
    options = ray_options(step, root, current)
    upload_inputs(step, root, tiers)
    ray = connect()
    fresh = options.pop("max_calls", 0) == 1  # Ray takes max_calls only where the remote function is made
    ref = _remote_function(ray, fresh).options(**options).remote(spec, _worker_config(tiers))
    result = wait_for(ray, ref, options, step)
    if not result.get("ok"):
        raise RemoteStepFailed(result["error"], result.get("facts"), result.get("log"))
    restored = tiers.restore(key, step.outputs, step.name)
    if restored is None:
        raise RemoteStepFailed(f"the Ray worker on {result.get('host')} built it, but its outputs could not be restored from the remote cache "
                               f"{tiers.remote.url} (see the warning above)", log=result.get("log"))
    return result | {"entry": restored[0]}


def make_spec(step: Step, root: Path, key: str, current: dict[str, Any]) -> dict[str, Any]:
    """What the worker needs, as plain JSON: no absolute path of the head's disk leaves it."""
    from kiln.execute.step import output_entry
    from kiln.rules import get_rule

    inputs = {}
    for role, files in step.inputs.items():
        inputs[role] = [output_entry(root, path) | {"path": placement(path, root, role, files)} for path in files]
    outputs = {role: placement(path, root, f"out/{role}", [path]) for role, path in step.outputs.items()}
    return {"format": SPEC_FORMAT, "step": step.name, "id": step.id, "model": step.model, "targets": list(step.targets),
            "rule": step.rule, "rule_module": get_rule(step.rule).__module__, "params": step.params,
            "inputs": inputs, "outputs": outputs, "key": key, "components": current}


def placement(path: Path, root: Path, slot: str, siblings: list[Path] | tuple[Path, ...]) -> str:
    """Where a file goes in the worker's scratch workspace: its workspace-relative path, or, for a
    file outside the workspace, its path below the deepest folder holding all of its role's files
    outside the workspace (`siblings`), under a folder of the role's own. A source read as a folder
    (a Hugging Face model: config.json, the weights and the tokenizer side by side, subfolders too)
    so stays one folder, with every name kept (keys hold file names)."""
    inside = workspace_path(path, root)
    if inside:
        return inside
    outside = [Path(os.path.abspath(p)) for p in siblings if not workspace_path(p, root)]
    common = Path(os.path.commonpath([str(p.parent) for p in outside])) if outside else Path(os.path.abspath(path)).parent
    return f".kiln-ray/outside/{slot}/{Path(os.path.abspath(path)).relative_to(common).as_posix()}"


def _objects(entry: dict[str, Any], base: Path) -> list[tuple[str, int, Path]]:
    """(sha256, bytes, file) of every object an output_entry-shaped entry names at base."""

    if "files" not in entry:
        return [(entry["sha256"], entry["bytes"], base)]
    return [(sha, size, base / rel) for rel, sha, size in entry["files"] if not is_empty_folder(rel)]


def upload_inputs(step: Step, root: Path, tiers: CacheTiers) -> None:
    """Every input object into the remote CAS (HEAD first, PUT what is missing)."""
    from kiln.execute.step import output_entry

    remote = tiers.remote
    assert remote is not None
    try:
        for files in step.inputs.values():
            for path in files:
                for sha256, size, source in _objects(output_entry(root, path), path):
                    if not remote.has_object(sha256, size):
                        remote.put_object(sha256, source)
    except RemoteUnavailable as err:
        raise RemoteStepFailed(f"cannot put its inputs in the remote cache {remote.url} for the Ray workers: {err}") from None


def ray_options(step: Step, root: Path, current: dict[str, Any]) -> dict[str, Any]:
    """Ray task options from the rule: memory, GPU + labels for hardware-specific steps, a fresh
    process for torch rules, retries on worker/node death only."""
    from kiln.execute.step import _input_bytes
    from kiln.rules import get_rule

    rule = get_rule(step.rule)
    mib = reservation_mib(root, step, rule.memory_mib(step.params, _input_bytes(step)))
    options: dict[str, Any] = {"num_cpus": 1, "memory": int(mib) << 20, "max_retries": retries(), "retry_exceptions": False,
                               "name": f"kiln:{step.name}"}
    selector = label_selector(current.get("hardware")) or runtime_selector(rule, step)
    if selector:
        options["num_gpus"] = 1
        options["label_selector"] = selector
    if "torch" in rule.tools_for(step.params):
        options["max_calls"] = 1  # torch.onnx.export's process-global state must not meet the next step
    return options


def runtime_selector(rule, step: Step) -> dict[str, str]:
    """A step that runs a TensorRT engine (the TensorRT validate: tensorrt among its tools, no hardware
    facts in its key) goes to the GPU kind the engine was built for: the facts build_tensorrt's key
    got (the cluster's GPU pool under this executor). {} for every other step."""
    if "tensorrt" not in rule.tools_for(step.params):
        return {}
    try:
        return label_selector(device_facts(int(step.params.get("device") or 0)))
    except CudaUnavailable as err:
        raise RemoteStepFailed(f"it runs TensorRT, and there is no GPU node to send it to: {err}") from None


def label_selector(hardware: Any) -> dict[str, str]:
    """The node labels a step with these hardware facts must run on: {} for portable steps; for a
    GPU step (its facts name a compute capability) each fact kiln labels nodes with."""
    if not isinstance(hardware, dict) or "compute_capability" not in hardware:
        return {}
    return {label: label_value(hardware[fact]) for fact, label in LABELS.items() if hardware.get(fact) is not None}


def label_value(value: Any) -> str:
    """A fact as a Ray label value (letters, digits, - _ . only; at most 63 characters)."""
    return _LABEL_VALUE.sub("_", str(value))[:63].strip("_.-") or "unknown"


def node_labels(facts: dict[str, Any]) -> dict[str, str]:
    """The labels a node with these device facts (kiln.base.cuda.device_facts) advertises: one per
    fact (what steps select on), and <label>-b32 with the exact text where the label lost some."""
    labels = {}
    for fact, label in LABELS.items():
        if facts.get(fact) is None:
            continue
        text = str(facts[fact])
        labels[label] = label_value(text)
        exact = base64.b32encode(text.encode()).decode().rstrip("=").lower()
        if labels[label] != text and len(exact) <= 63:  # longer: the label's form stands, and the worker's check says so
            labels[label + EXACT_SUFFIX] = exact
    return labels


def facts_from_labels(labels: dict[str, str]) -> dict[str, Any]:
    """node_labels undone: the device facts a node's kiln labels describe (exact where a -b32 label
    holds them; a fact with no label is None, as device_facts gives a driver it could not read)."""
    facts: dict[str, Any] = {}
    for fact, label in LABELS.items():
        value: Any = labels.get(label)
        exact = labels.get(label + EXACT_SUFFIX)
        if exact:
            value = base64.b32decode(exact.upper() + "=" * (-len(exact) % 8)).decode()
        if fact in INT_FACTS and isinstance(value, str) and value.isdigit():
            value = int(value)
        facts[fact] = value
    return facts


def wait_for(ray, ref, options: dict[str, Any], step: Step) -> dict[str, Any]:
    """The worker's result. Gives up (and cancels the task) once no live node could have taken it
    for KILN_RAY_TIMEOUT seconds: Ray would leave such a task pending forever."""
    limit = timeout_s()
    unfit_since: float | None = None
    while True:
        done, _ = ray.wait([ref], timeout=POLL_S)
        if done:
            return _result(ray, ref)
        if fitting_nodes(_nodes(ray), options):
            unfit_since = None
            continue
        unfit_since = unfit_since if unfit_since is not None else time.monotonic()
        if time.monotonic() - unfit_since >= limit:
            ray.cancel(ref, force=True)
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            raise RemoteStepFailed(f"no node of the Ray cluster ({alive} alive) can take it: it asks for {describe_request(options)}; "
                                   f"waited {limit:g} s ({ENV_TIMEOUT}). Start a worker that has it (kiln worker --address HEAD "
                                   "on a machine with that GPU / memory)")


_seen: dict[str, Any] = {"at": 0.0, "nodes": []}
_seen_lock = threading.Lock()


def _nodes(ray) -> list[dict[str, Any]]:
    """ray.nodes(), asked at most once per POLL_S however many steps wait (doit -n 32: 32 threads)."""
    with _seen_lock:
        if time.monotonic() - _seen["at"] >= POLL_S:
            _seen.update(at=time.monotonic(), nodes=ray.nodes())
        return _seen["nodes"]


def _result(ray, ref) -> dict[str, Any]:
    from ray import exceptions

    try:
        return ray.get(ref)
    except exceptions.TaskCancelledError:
        raise RemoteStepFailed("the Ray task running it was cancelled") from None
    except exceptions.RayTaskError as err:  # the worker function itself raised (it catches the rule's errors)
        raise RemoteStepFailed(f"the Ray worker failed: {one_line(err.cause if err.cause is not None else err)[:400]}") from None
    except exceptions.RayError as err:  # NodeDiedError, WorkerCrashedError, OutOfMemoryError, ...
        raise RemoteStepFailed(f"the Ray worker running it died ({type(err).__name__}: {one_line(err)[:300]}); nothing of it was "
                               "stored, rerun to build it again") from None


def fitting_nodes(nodes: list[dict[str, Any]], options: dict[str, Any]) -> list[str]:
    """Ids of the live nodes whose total resources and labels admit the task (whether they are
    free now does not matter: a busy node takes it later)."""
    wanted = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0), "memory": options.get("memory", 0)}
    selector = options.get("label_selector") or {}
    fit = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources, labels = node.get("Resources", {}), node.get("Labels", {})
        if all(resources.get(name, 0) >= amount for name, amount in wanted.items() if amount) and \
                all(labels.get(label) == value for label, value in selector.items()):
            fit.append(node.get("NodeID", "?"))
    return fit


def describe_request(options: dict[str, Any]) -> str:
    parts = [f"{options.get('num_cpus', 1)} CPU", f"{options.get('memory', 0) / (1 << 30):.2f} GiB memory"]
    if options.get("num_gpus"):
        parts.append(f"{options['num_gpus']} GPU")
    selector = options.get("label_selector") or {}
    if selector:
        parts.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(selector.items())))
    return ", ".join(parts)


def _worker_config(tiers: CacheTiers):
    """The remote cache settings the worker uses: the head's, always uploading, and every failure an
    error (a worker whose outputs do not reach the cache has built nothing the head can use)."""
    assert tiers.config is not None
    return dataclasses.replace(tiers.config, upload=True, required=True, required_by="the Ray executor")


def _write_log(log: Path, text: str | None) -> None:

    if text is not None:
        write_bytes_atomic(log, text.encode("utf-8", "backslashreplace"))


_REMOTE: dict[tuple[int, bool], Any] = {}


def _remote_function(ray, fresh_process: bool = False):
    """worker_main as a Ray remote function (made once per process): with fresh_process, each call
    gets a worker process of its own (max_calls=1: the process exits after it)."""
    made = (os.getpid(), fresh_process)
    if made not in _REMOTE:
        _REMOTE[made] = ray.remote(max_calls=1)(worker_main) if fresh_process else ray.remote(worker_main)
    return _REMOTE[made]


# ---- the worker ----------------------------------------------------------------------------------

def worker_main(spec: dict[str, Any], config) -> dict[str, Any]:
    """Runs in a Ray worker: build one step from its spec in a private scratch workspace and publish
    it to the remote cache. Returns {"ok", "entry" | "error", "facts", "log", "node", "host"}; only
    a dying process or node gets past it as a Ray error."""
    here = _where()
    scratch = Path(tempfile.mkdtemp(prefix="kiln-ray-", dir=os.environ.get(ENV_SCRATCH) or None))
    try:
        return here | _build_in(scratch, spec, _with_worker_token(config), here["host"])
    except Exception as err:  # a bug or an unexpected environment: still one line for the head
        return here | {"ok": False, "error": f"on the Ray worker {here['host']}: {type(err).__name__}: {one_line(err)[:400]}"}
    finally:
        forget_modules_under(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


def forget_modules_under(folder: Path) -> None:
    """Drop the modules a step imported from its scratch workspace (a source's factory module) from
    sys.modules: this worker process serves other steps next, and a module of the same name there
    (another build's models/iris.py) must be imported from its own bytes, not handed back from here."""
    import importlib
    import sys

    prefix = os.path.join(str(folder), "")
    for name, module in list(sys.modules.items()):
        if any(place.startswith(prefix) for place in _module_places(module)):
            sys.modules.pop(name, None)
    importlib.invalidate_caches()


def _module_places(module) -> list[str]:
    """Where a module was loaded from: its file, and a package's folders. Some modules answer
    getattr with anything (torch._classes gives an object for every name): only strings count."""
    try:
        found = getattr(module, "__file__", None)
        places = [found] if isinstance(found, str) else []
        folders = getattr(module, "__path__", None)
        if isinstance(folders, (list, tuple)) or type(folders).__name__ == "_NamespacePath":
            places += [f for f in folders if isinstance(f, str)]
        return places
    except Exception:  # a module whose attributes raise: not one of ours
        return []


def _where() -> dict[str, str]:
    node = ""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker (called directly, e.g. by a test)
        pass
    return {"node": node, "host": socket.gethostname()}


def _with_worker_token(config):
    """A worker's own KILN_REMOTE_CACHE_TOKEN wins over the head's (each machine may hold its own)."""
    token = os.environ.get("KILN_REMOTE_CACHE_TOKEN", "").strip()
    return dataclasses.replace(config, token=token) if token else config


def _build_in(scratch: Path, spec: dict[str, Any], config, host: str) -> dict[str, Any]:
    from kiln.execute.step import _execute, output_entry

    if spec.get("format") != SPEC_FORMAT:
        return {"ok": False, "error": f"the Ray worker on {host} runs a kiln with another step format ({SPEC_FORMAT}, the head sent "
                                      f"{spec.get('format')}): install the same kiln on the head and the workers"}
    mismatch = check_worker(spec)
    if mismatch:
        return {"ok": False, "error": f"the Ray worker on {host} does not match the step's key: {mismatch}; "
                                      "install the same versions on the head and the workers"}
    tiers = CacheTiers(Cache(scratch / ".kiln" / "cache"), RemoteCache(config))
    problem = fetch_inputs(spec, scratch, tiers.remote)
    if problem:
        return {"ok": False, "error": f"the Ray worker on {host} could not fetch its inputs from the remote cache {config.url}: {problem}"}
    step = Step(id=spec["id"], rule=spec["rule"], params=spec["params"], model=spec["model"], targets=list(spec["targets"]),
                inputs={role: tuple(scratch / f["path"] for f in files) for role, files in spec["inputs"].items()},
                outputs={role: scratch / rel for role, rel in spec["outputs"].items()})
    started = time.monotonic()
    with metered() as meter:
        info = _execute(step, scratch, f"sent to the Ray worker on {host}", started, meter)
    log = _read_log(log_path(scratch, step))
    if not isinstance(info, dict):  # the step's StepFailed: its failure file has the line and facts
        failure = json.loads(failure_path(scratch, step).read_text())
        return {"ok": False, "error": failure["error"].removeprefix(f"{step.name}: "), "facts": failure.get("facts", {}), "log": log}
    outputs = {role: output_entry(scratch, path) for role, path in step.outputs.items()}
    try:
        tiers.store(spec["key"], outputs, scratch, info)
        tiers.share(spec["key"], ran=True)  # objects first, the entry last; any failure raises (required)
    except KilnError as err:
        return {"ok": False, "error": f"the Ray worker on {host} built it but could not upload it: {err}", "log": log}
    return {"ok": True, "entry": tiers.local.get_entry(spec["key"]), "log": log}


def check_worker(spec: dict[str, Any]) -> str:
    """"" when this worker's rule version, tool versions and hardware facts are the spec's (so its
    output is what the key stands for); else each difference with both sides."""
    import importlib

    from kiln.rules import all_rules, get_rule

    if spec["rule"] not in all_rules():  # a rule outside kiln's own (a plugin's): import its module here too
        importlib.import_module(spec["rule_module"])
    rule = get_rule(spec["rule"])
    head = spec["components"]
    if step_key(head) != spec["key"]:
        return f"the spec's key {spec['key'][:16]} is not the key of its components"
    differences = []
    if rule.version != head.get("version"):
        differences.append(f"rule {spec['rule']} version: head {head.get('version')}, worker {rule.version}")
    mine = tool_versions(rule.tools_for(spec["params"]))
    for tool in sorted(set(mine) | set(head.get("tools", {}))):
        if mine.get(tool) != head.get("tools", {}).get(tool):
            differences.append(f"tool {tool}: head {head.get('tools', {}).get(tool)}, worker {mine.get(tool)}")
    hardware = rule.hardware_for(spec["params"])
    if hardware != head.get("hardware"):
        differences.append(f"hardware: head {json.dumps(head.get('hardware'), sort_keys=True)}, worker {json.dumps(hardware, sort_keys=True)}")
    return "; ".join(differences)


def fetch_inputs(spec: dict[str, Any], scratch: Path, remote) -> str:
    """Each input object from CAS to its relative path in scratch, verified; "" or what went wrong."""

    for role, files in spec["inputs"].items():
        for entry in files:
            base = scratch / _inside(entry["path"])
            if "files" in entry:
                base.mkdir(parents=True, exist_ok=True)
                for rel, _, _ in entry["files"]:
                    if rel.endswith("/"):  # an empty folder of the input
                        (base / _inside(rel[:-1])).mkdir(parents=True, exist_ok=True)
            for sha256, size, dest in _objects(entry, base):
                dest = scratch / _inside(str(dest.relative_to(scratch)))
                dest.parent.mkdir(parents=True, exist_ok=True)
                temp = temp_path(dest, "fetch")
                try:
                    problem = remote.fetch_object(sha256, size, temp)
                except RemoteUnavailable as err:
                    problem = str(err)
                if problem is not None:
                    temp.unlink(missing_ok=True)
                    return f"input {role} {entry['path']} (object {sha256[:16]}): {problem}"
                os.replace(temp, dest)
    return ""


def _inside(rel: str) -> str:
    """A relative path from the spec, refused when it would leave the scratch workspace."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ".." in parts:
        raise ValueError(f"the spec names the path {rel!r}, which is not inside the workspace")
    return rel


def _read_log(log: Path) -> str | None:
    try:
        data = log.read_bytes()
    except OSError:
        return None
    if len(data) > LOG_LIMIT:
        data = b"[... the worker's log is cut to its last %d bytes ...]\n" % LOG_LIMIT + data[-LOG_LIMIT:]
    return data.decode("utf-8", "replace")


# ---- `kiln worker`: a node that joins the cluster with kiln's labels -----------------------------

def worker_command(head: str, num_cpus: int | None = None, extra: list[str] | None = None) -> tuple[list[str], str]:
    """`ray start` joining the cluster at head, with the labels of this machine's GPU (device 0's
    facts: GPU, compute capability, driver, TensorRT version) so GPU steps can select it, and what
    was found, in words. A machine without a usable GPU joins as a CPU node."""
    import shutil as _shutil
    import sys


    ray_cli = _shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    command = [ray_cli, "start", "--address", head, "--disable-usage-stats"]
    try:
        facts = device_facts(0)
    except CudaUnavailable as err:
        found = f"no GPU for TensorRT steps ({err}); joining as a CPU node"
    else:
        labels = node_labels(facts)
        command += ["--labels", ",".join(f"{k}={v}" for k, v in sorted(labels.items()))]
        found = "GPU node: " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    return command + list(extra or []), found


def start_worker(head: str, num_cpus: int | None = None, dry_run: bool = False) -> int:
    """`kiln worker --address HEAD`: print what this node offers, then start Ray's node processes
    (`ray start` returns once they run in the background; `ray stop` ends them)."""
    import subprocess

    command, found = worker_command(head, num_cpus)
    print(f"kiln worker: {found}")
    print("kiln worker: " + " ".join(command))
    if dry_run:
        return 0
    env = os.environ | RAY_DEFAULTS
    return subprocess.run(command, env=env, check=False).returncode
