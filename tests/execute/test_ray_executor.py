"""kiln.execute.ray_executor against a real local Ray cluster (ray.cluster_utils.Cluster: a head, a
pretend GPU node and a CPU node, all on 127.0.0.1) and a real remote cache (nginx, tests/nginx_server.py).

TensorRT cannot be installed here, so the GPU-routed step is a test-only rule (tests/ray_rules.py)
whose hardware facts are a pretend GPU's: the pretend GPU node advertises them as labels (as
`kiln worker` does from kiln.base.cuda) and in its environment (where the rule's hardware_for reads
them on the worker, so a step routed to another node fails its hardware check). The head (this test
process) has no GPU: its keys get the GPU facts from the cluster's GPU pool (use_cluster_gpu_facts),
as under `kiln build --executor ray`.

Covers: a GPU step planned on the GPU-less head gets the pool's exact facts in its key and lands on
the pretend GPU node (num_gpus=1: CUDA_VISIBLE_DEVICES is set there), a CPU step on another node,
both come back through the remote cache with their log, and a second workspace then restores them
without Ray; the nodes read from a subprocess (how a planning process reads them) are the same; two
GPU pools without KILN_RAY_GPU fail the step at once naming both, and KILN_RAY_GPU picks one (the
step lands there); pools, KILN_RAY_GPU and "no GPU node" from node lists; exact facts survive Ray's
label syntax; planning a TensorRT manifest on a head without tensorrt under the pool's facts (and
the TensorRT validate routed to the pool's GPU); a step no node can take fails after KILN_RAY_TIMEOUT naming
the labels it asked for; a worker whose tool versions differ from the head's key fails naming both;
no remote cache -> one-line error (step and CLI); labels are valid Ray labels; `kiln worker` labels a
GPU node and joins a GPU-less one as a CPU node; a worker forgets the modules a step imported from its
scratch workspace. Slow: a node killed
mid-step fails the step cleanly (nothing in the workspace or the remote cache) and a rerun on a new
node succeeds; sklearn_iris and tinycnn built through the cluster (a head process of their own,
-n 4) are byte-identical to local builds."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from doit.exceptions import TaskFailed  # noqa: E402

from conftest import REPO, example_workspace  # noqa: E402
from nginx_server import NginxCache, start_nginx  # noqa: E402
from ray_rules import PRETEND_GPU  # noqa: E402  (registers the test rules)

from kiln.base.cuda import CudaUnavailable, device_facts  # noqa: E402
from kiln.execute import ray_executor  # noqa: E402
from kiln.execute.step import run_step  # noqa: E402
from kiln.plan.steps import Step  # noqa: E402
from kiln.state.records import log_path, read_record  # noqa: E402
from kiln.state.uptodate import components  # noqa: E402

TOKEN = "ray-test-token"
GPU_FACTS = {"gpu": "Pretend GPU 9000", "compute_capability": "9.0", "cuda_driver": 13000, "tensorrt": "10.3.0"}
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


class RayTestCluster:
    def __init__(self, cluster, gpu, cpu, node_env):
        self.cluster, self.gpu, self.cpu, self.node_env = cluster, gpu, cpu, node_env

    def add_gpu_node(self, facts: dict):
        return self.cluster.add_node(num_cpus=1, num_gpus=1, labels=ray_executor.node_labels(facts),
                                     env_vars=self.node_env | {PRETEND_GPU: json.dumps(facts)})


@pytest.fixture(scope="session")
def cluster():
    """Head (1 CPU), pretend GPU node (1 CPU, 1 GPU, labels), CPU node (1 CPU); this process connected."""
    from ray.cluster_utils import Cluster

    saved = {name: os.environ.get(name) for name in RAY_ENV}
    os.environ.update(RAY_ENV)
    tests = str(REPO / "tests")  # workers import the test rules' module (ray_rules) by name
    node_env = RAY_ENV | {"PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "env_vars": node_env})
    try:
        handle = RayTestCluster(made, None, None, node_env)
        handle.gpu = handle.add_gpu_node(GPU_FACTS)
        handle.cpu = made.add_node(num_cpus=1, env_vars=node_env)
        ray.init(address=made.address, log_to_driver=False, logging_level="WARNING")
        yield handle
    finally:
        ray.shutdown()
        made.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> NginxCache:
    nginx = start_nginx(tmp_path_factory.mktemp("nginx"), TOKEN)
    yield nginx
    nginx.stop()


@pytest.fixture
def remote(server, monkeypatch, request) -> Path:
    """This test's instance on the server (its files' folder); the Ray executor on, the cache uploading."""
    instance = request.node.name.replace("[", "_").replace("]", "_")[:60]
    monkeypatch.setenv("KILN_REMOTE_CACHE", f"{server.url}/{instance}")
    monkeypatch.setenv("KILN_REMOTE_CACHE_TOKEN", TOKEN)
    monkeypatch.setenv("KILN_REMOTE_CACHE_UPLOAD", "1")
    monkeypatch.setenv(ray_executor.ENV_EXECUTOR, "ray")
    monkeypatch.delenv("KILN_CACHE", raising=False)
    monkeypatch.delenv("KILN_CACHE_DIR", raising=False)
    return server.files / instance


@pytest.fixture
def pool_facts(cluster, monkeypatch):
    """This process as the head of `kiln build --executor ray`: no GPU of its own (no
    KILN_PRETEND_GPU), GPU facts for keys from the cluster's GPU pool. Yields a function that
    forgets what was read (after the cluster or KILN_RAY_GPU changed)."""
    monkeypatch.delenv(PRETEND_GPU, raising=False)
    monkeypatch.delenv(ray_executor.ENV_GPU, raising=False)
    monkeypatch.setenv(ray_executor.ENV_ADDRESS, cluster.cluster.address)

    def reread():
        ray_executor.use_cluster_gpu_facts(False)
        ray_executor.use_cluster_gpu_facts(True)

    reread()
    yield reread
    ray_executor.use_cluster_gpu_facts(False)


def make_step(root: Path, rule: str = "test_ray_upper", text: str = "hello ray", **params) -> Step:
    source = root / "src" / "in.txt"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(text)
    step_id = f"{rule}-{abs(hash(json.dumps(params, sort_keys=True))) % 10**8}"
    return Step(id=step_id, rule=rule, params=dict(params), inputs={"text": (source,)},
                outputs={"text": root / "build" / ".steps" / step_id / "out.txt"}, model="m", targets=["t"])


def temps_under(root: Path) -> list[Path]:
    return [p for p in (root / "build").rglob(".*") if p.is_file() and ".kiln" not in p.parts] if (root / "build").exists() else []


def test_a_gpu_step_from_a_gpu_less_head_gets_the_pools_facts_and_lands_on_the_gpu_node(cluster, pool_facts, remote, tmp_path, monkeypatch):
    root = tmp_path / "a"
    gpu_step = make_step(root, "test_ray_pretend_gpu", suffix="!")
    cpu_step = make_step(root, "test_ray_upper")
    assert components(gpu_step, root)["hardware"] == GPU_FACTS  # exact: "Pretend GPU 9000" and the driver as an integer
    assert "hardware" not in components(cpu_step, root)
    for step in (gpu_step, cpu_step):
        result = run_step(step, root, remote=ray_executor.run_remote)
        assert not isinstance(result, TaskFailed), result
        assert step.outputs["text"].read_text().startswith("HELLO RAY")
        assert (remote / "ac" / result["key"]).is_file()  # the worker published it; the head restored it from there
    gpu_info, cpu_info = read_record(root, gpu_step).info, read_record(root, cpu_step).info
    assert gpu_info["node"] == cluster.gpu.node_id and gpu_info["cuda_visible_devices"] == "0"
    assert cpu_info["node"] not in ("", cluster.gpu.node_id)
    assert gpu_info["pid"] != os.getpid()
    log = log_path(root, gpu_step).read_text()
    assert log.startswith(f"kiln: ran on the Ray node {cluster.gpu.node_id}") and "ray test rule ran" in log

    # a second workspace gets both from the remote cache, without sending anything to the cluster
    monkeypatch.setattr(ray_executor, "send", lambda *a, **k: pytest.fail("sent to Ray despite a remote hit"))
    other = tmp_path / "b"
    for step in (make_step(other, "test_ray_pretend_gpu", suffix="!"), make_step(other, "test_ray_upper")):
        assert not isinstance(run_step(step, other, remote=ray_executor.run_remote), TaskFailed)
        record = read_record(other, step).data
        assert record["restored"] and record["reason"].endswith("restored from the remote cache")


def test_a_planning_process_reads_the_same_nodes_from_a_subprocess(cluster, monkeypatch):
    in_process = ray_executor.alive_nodes(cluster.cluster.address)
    monkeypatch.setitem(sys.modules, "ray", None)  # as a process that never connected: planning, before doit -n forks
    from_subprocess = ray_executor.alive_nodes(cluster.cluster.address)
    labels = sorted(json.dumps(n["Labels"], sort_keys=True) for n in from_subprocess)
    assert labels == sorted(json.dumps(n["Labels"], sort_keys=True) for n in in_process)
    assert ray_executor.choose_pool(from_subprocess, "") == GPU_FACTS


def test_two_gpu_pools_need_kiln_ray_gpu_which_picks_one(cluster, pool_facts, remote, tmp_path, monkeypatch):
    other_facts = GPU_FACTS | {"gpu": "Pretend GPU 7000", "compute_capability": "8.6"}
    other = cluster.add_gpu_node(other_facts)
    try:
        cluster.cluster.wait_for_nodes()
        pool_facts()
        root = tmp_path / "ws"
        step = make_step(root, "test_ray_pretend_gpu", suffix="#")
        result = run_step(step, root, remote=ray_executor.run_remote)  # fails at once: nothing is sent
        assert isinstance(result, TaskFailed)
        line = result.kiln_line
        assert "cannot send it to a GPU node: the Ray cluster has 2 GPU pools" in line and "\n" not in line
        assert "kiln-gpu=Pretend_GPU_7000 kiln-cuda-cc=8.6" in line and "kiln-gpu=Pretend_GPU_9000 kiln-cuda-cc=9.0" in line
        assert "set KILN_RAY_GPU to one pool's kiln-gpu or kiln-cuda-cc value" in line
        assert not step.outputs["text"].exists()

        monkeypatch.setenv(ray_executor.ENV_GPU, "8.6")
        pool_facts()
        assert device_facts(0) == other_facts
        result = run_step(step, root, remote=ray_executor.run_remote)
        assert not isinstance(result, TaskFailed), result
        assert read_record(root, step).info["node"] == other.node_id
        assert read_record(root, step).components["hardware"] == other_facts
    finally:
        cluster.cluster.remove_node(other)


def _node(labels: dict | None = None, gpus: int = 0, alive: bool = True, name: str = "n") -> dict:
    return {"NodeID": name, "Alive": alive, "Labels": labels or {}, "Resources": {"CPU": 4.0} | ({"GPU": float(gpus)} if gpus else {})}


def test_gpu_pools_kiln_ray_gpu_and_no_gpu_node_from_node_lists():
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda_driver": 12080, "tensorrt": "10.13.3.9"}
    a100 = {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "cuda_driver": 12080, "tensorrt": "10.13.3.9"}
    a6000 = {"gpu": "NVIDIA RTX A6000", "compute_capability": "8.6", "cuda_driver": 12080, "tensorrt": "10.13.3.9"}
    a10 = a6000 | {"gpu": "NVIDIA A10"}
    label = ray_executor.node_labels
    one_pool = [_node(label(h100), 8, name="a"), _node(label(h100), 8, name="b"), _node(), _node(label(a100), 8, alive=False)]
    assert ray_executor.gpu_pools(one_pool) == [(label(h100), 2)]
    assert ray_executor.choose_pool(one_pool, "") == h100  # exact: spaces back, driver an integer

    several = one_pool + [_node(label(a100), 8), _node(label(a6000), 2), _node(label(a10), 1)]
    with pytest.raises(CudaUnavailable) as caught:
        ray_executor.choose_pool(several, "")
    line = str(caught.value)
    assert line.startswith("the Ray cluster has 4 GPU pools (nodes with different kiln labels): ") and "\n" not in line
    assert "kiln-gpu=NVIDIA_H100_80GB_HBM3 kiln-cuda-cc=9.0 kiln-cuda-driver=12080 kiln-tensorrt=10.13.3.9 (2 nodes)" in line
    assert "kiln-gpu=NVIDIA_A10 kiln-cuda-cc=8.6" in line and "set KILN_RAY_GPU to one pool's kiln-gpu or kiln-cuda-cc value" in line
    assert ray_executor.choose_pool(several, "9.0") == h100  # by compute capability
    assert ray_executor.choose_pool(several, "NVIDIA_A100-SXM4-80GB") == a100  # by the kiln-gpu label
    assert ray_executor.choose_pool(several, "NVIDIA RTX A6000") == a6000  # by the exact GPU name
    with pytest.raises(CudaUnavailable, match=r"KILN_RAY_GPU='8.6' matches 2 GPU pools: .*; set it to one pool's kiln-gpu value"):
        ray_executor.choose_pool(several, "8.6")
    with pytest.raises(CudaUnavailable, match=r"KILN_RAY_GPU='7.5' names none of the Ray cluster's GPU pools: kiln-gpu="):
        ray_executor.choose_pool(several, "7.5")

    with pytest.raises(CudaUnavailable) as caught:
        ray_executor.choose_pool([_node(), _node({}, gpus=1), _node(label(h100), 8, alive=False)], "")
    assert str(caught.value) == ("the Ray cluster has no GPU node with kiln's labels (2 alive nodes, 1 with GPUs but without kiln's "
                                 "labels (started by plain `ray start`)): start one with `kiln worker --address HEAD:PORT` on a "
                                 "machine with an NVIDIA GPU and TensorRT")


def test_planning_a_tensorrt_manifest_on_a_head_without_tensorrt_uses_the_pools_facts(tmp_path, monkeypatch):
    """No cluster needed: the pool is a stand-in source. The head has no tensorrt (nor a GPU); under
    the pool its TensorRT targets are planned in a wildcard build, their keys hold the pool's facts,
    the TensorRT version in keys is the pool's, and the validate step is routed to that GPU."""
    import importlib.util

    import kiln.base.cuda as cuda
    from kiln.base.tools import tool_version
    from kiln.plan.load import plan_manifests
    from kiln.rules import get_rule

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: a head without it is what is tested")
    facts = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda_driver": 12080, "tensorrt": "10.13.3.9"}
    ws = example_workspace(tmp_path / "ws", "bert_tensorrt")
    manifest = ws.root / "manifests" / "bert_tensorrt.toml"
    unplanned = plan_manifests(ws.root, [manifest], wildcard=True)[0]
    assert unplanned.steps == [] and len(unplanned.skipped) == 3  # no GPU, no pool: left out, as before

    monkeypatch.setenv(ray_executor.ENV_ADDRESS, "10.0.0.5:6379")
    monkeypatch.setattr(ray_executor, "alive_nodes", lambda where: [_node(ray_executor.node_labels(facts), 1)])
    ray_executor.use_cluster_gpu_facts()
    try:
        assert isinstance(cuda.probe_source(), ray_executor.ClusterGpuPool)
        planned = plan_manifests(ws.root, [manifest], wildcard=True)[0]
        assert planned.skipped == {}
        builds = [s for s in planned.steps if s.rule == "build_tensorrt"]
        assert len(builds) == 3 and all(get_rule("build_tensorrt").hardware_for(s.params) == facts for s in builds)
        assert tool_version("tensorrt") == "10.13.3.9"  # the TensorRT validate's key: the pool's version, as its worker has
        validate = next(s for s in planned.steps if s.rule == "validate" and s.params.get("format") == "tensorrt")
        options = ray_executor.ray_options(validate, ws.root, {"tools": {}})
        assert options["num_gpus"] == 1 and options["label_selector"] == ray_executor.label_selector(facts)

        ray_executor.use_cluster_gpu_facts(False)  # a cluster without GPU nodes: skipped, saying so
        monkeypatch.setattr(ray_executor, "alive_nodes", lambda where: [_node(), _node()])
        ray_executor.use_cluster_gpu_facts()
        skipped = plan_manifests(ws.root, [manifest], wildcard=True)[0].skipped
        assert len(skipped) == 3 and all("the Ray cluster has no GPU node with kiln's labels (2 alive nodes)" in r for r in skipped.values())
    finally:
        ray_executor.use_cluster_gpu_facts(False)
    assert cuda.probe_source() is None and tool_version("tensorrt") == "not installed"


def test_a_step_no_node_can_take_fails_after_the_timeout_naming_what_it_asked_for(cluster, remote, tmp_path, monkeypatch):
    monkeypatch.setenv(PRETEND_GPU, json.dumps(GPU_FACTS | {"compute_capability": "7.5"}))  # no node has this GPU
    monkeypatch.setenv(ray_executor.ENV_TIMEOUT, "2")
    root = tmp_path / "ws"
    step = make_step(root, "test_ray_pretend_gpu")
    started = time.monotonic()
    result = run_step(step, root, remote=ray_executor.run_remote)
    assert isinstance(result, TaskFailed)
    assert time.monotonic() - started < 30
    line = result.kiln_line
    assert "no node of the Ray cluster (3 alive) can take it" in line and "kiln-cuda-cc=7.5" in line and "1 GPU" in line
    assert "KILN_RAY_TIMEOUT" in line
    assert not step.outputs["text"].exists() and not temps_under(root)


def test_a_worker_whose_tool_versions_differ_from_the_key_fails_showing_both(cluster, remote, tmp_path, monkeypatch):
    from importlib import metadata

    import kiln.state.uptodate as uptodate

    real = uptodate.tool_versions
    monkeypatch.setattr(uptodate, "tool_versions", lambda names: real(names) | {"numpy": "0.0.1"})  # the head's key only
    root = tmp_path / "ws"
    step = make_step(root, "test_ray_upper", suffix="?")
    result = run_step(step, root, remote=ray_executor.run_remote)
    assert isinstance(result, TaskFailed)
    assert f"tool numpy: head 0.0.1, worker {metadata.version('numpy')}" in result.kiln_line
    assert "does not match the step's key" in result.kiln_line
    assert not step.outputs["text"].exists()
    assert not list((remote / "ac").glob("*")) if (remote / "ac").exists() else True


def test_the_ray_executor_needs_a_remote_cache(tmp_path, monkeypatch, capsys):
    from kiln.cli import main

    monkeypatch.delenv("KILN_REMOTE_CACHE", raising=False)
    monkeypatch.setenv(ray_executor.ENV_EXECUTOR, "ray")
    root = tmp_path / "ws"
    step = make_step(root)
    result = run_step(step, root, remote=ray_executor.run_remote)
    assert isinstance(result, TaskFailed) and "needs the local cache on and a remote cache" in result.kiln_line
    monkeypatch.delenv(ray_executor.ENV_EXECUTOR)
    ws = example_workspace(tmp_path / "cli", "sklearn_iris")
    assert main(["--root", str(ws.root), "build", "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kiln: error: --executor ray: needs a remote cache, since steps' inputs and outputs travel through it: "
                   "set KILN_REMOTE_CACHE=http://host:port (or url in kiln.toml [remote_cache])"]
    assert ray_executor.ENV_EXECUTOR not in os.environ  # the flag does not outlive the build


def test_settings_and_labels(monkeypatch):
    from ray._private.label_utils import validate_node_label_syntax

    from kiln.errors import UsageError

    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda_driver": 12080, "tensorrt": "10.13.3.9"}
    labels = ray_executor.node_labels(h100)
    validate_node_label_syntax(labels)  # what `ray start --labels` accepts
    assert labels["kiln-gpu"] == "NVIDIA_H100_80GB_HBM3" and labels["kiln-cuda-cc"] == "9.0"
    assert ray_executor.facts_from_labels(labels) == h100  # exact again: kiln-gpu-b32 holds the name
    assert set(labels) == {"kiln-gpu", "kiln-gpu-b32", "kiln-cuda-cc", "kiln-cuda-driver", "kiln-tensorrt"}  # only lossy facts get one
    odd = {"gpu": "GPU_with__underscores/and é", "compute_capability": "12.0", "cuda_driver": None, "tensorrt": "11.0.0+cuda13"}
    validate_node_label_syntax(ray_executor.node_labels(odd))
    assert ray_executor.facts_from_labels(ray_executor.node_labels(odd)) == odd
    assert ray_executor.label_selector({"os": "macOS"}) == {}  # hardware facts without a GPU: no GPU asked for
    selector = ray_executor.label_selector(GPU_FACTS)  # what a GPU step asks for: the readable labels
    assert selector == {k: v for k, v in ray_executor.node_labels(GPU_FACTS).items() if k in ray_executor.LABELS.values()}
    monkeypatch.setenv(ray_executor.ENV_TIMEOUT, "soon")
    with pytest.raises(UsageError, match="KILN_RAY_TIMEOUT: 'soon' is not allowed"):
        ray_executor.timeout_s()
    monkeypatch.setenv(ray_executor.ENV_EXECUTOR, "dask")
    with pytest.raises(UsageError, match="KILN_EXECUTOR: 'dask' is not an executor; allowed: local, ray"):
        ray_executor.executor()
    assert ray_executor.fitting_nodes([{"Alive": True, "NodeID": "n", "Resources": {"CPU": 2, "memory": 4 << 30}, "Labels": {}}],
                                      {"num_cpus": 1, "memory": 8 << 30}) == []  # not enough memory anywhere


def test_kiln_worker_starts_a_ray_node_labelled_with_its_gpu(monkeypatch, capsys):
    import kiln.base.cuda as cuda
    from kiln.cli import main

    monkeypatch.setattr(ray_executor, "device_facts", lambda ordinal: GPU_FACTS)
    command, found = ray_executor.worker_command("10.0.0.5:6379", num_cpus=4)
    assert command[1:5] == ["start", "--address", "10.0.0.5:6379", "--disable-usage-stats"]
    labels = command[command.index("--labels") + 1]
    assert labels == ("kiln-cuda-cc=9.0,kiln-cuda-driver=13000,kiln-gpu=Pretend_GPU_9000,kiln-gpu-b32=kbzgk5dfnzscar2qkuqdsmbqga,"
                      "kiln-tensorrt=10.3.0")
    assert command[-2:] == ["--num-cpus", "4"] and found.startswith("GPU node: ")

    def no_gpu(ordinal):
        raise cuda.CudaUnavailable("the tensorrt package is not installed")

    monkeypatch.setattr(ray_executor, "device_facts", no_gpu)
    assert main(["worker", "--address", "10.0.0.5:6379", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "joining as a CPU node" in out and "--labels" not in out


def test_a_worker_forgets_the_modules_a_step_imported_from_its_scratch_workspace(tmp_path, monkeypatch):
    import importlib
    import sys

    for scratch, value in ((tmp_path / "one", 1), (tmp_path / "two", 2)):  # two builds' models/factory.py, one name
        (scratch / "models").mkdir(parents=True)
        (scratch / "models" / "factory.py").write_text(f"VALUE = {value}\n")
        monkeypatch.syspath_prepend(str(scratch))
        assert importlib.import_module("models.factory").VALUE == value  # not the first scratch's module
        ray_executor.forget_modules_under(scratch)
        assert "models.factory" not in sys.modules and "models" not in sys.modules


@pytest.mark.slow
def test_a_node_killed_mid_step_fails_cleanly_and_a_rerun_succeeds(cluster, remote, tmp_path, monkeypatch):
    doomed_facts = GPU_FACTS | {"compute_capability": "8.6", "gpu": "Doomed GPU"}
    monkeypatch.setenv(PRETEND_GPU, json.dumps(doomed_facts))
    monkeypatch.setenv(ray_executor.ENV_RETRIES, "0")  # else Ray reruns it, and waits for a node with that GPU
    doomed = cluster.add_gpu_node(doomed_facts)
    root = tmp_path / "ws"
    hold, started = tmp_path / "hold", tmp_path / "started"
    hold.write_text("wait")
    step = make_step(root, "test_ray_pretend_gpu", hold=str(hold), started=str(started))
    results = []
    runner = threading.Thread(target=lambda: results.append(run_step(step, root, remote=ray_executor.run_remote)))
    runner.start()
    deadline = time.monotonic() + 120
    while not started.exists():
        assert time.monotonic() < deadline, "the step never started on the doomed node"
        time.sleep(0.1)
    cluster.cluster.remove_node(doomed, allow_graceful=False)
    runner.join(timeout=120)
    assert results and isinstance(results[0], TaskFailed), results
    assert "died" in results[0].kiln_line and "rerun" in results[0].kiln_line
    assert not step.outputs["text"].exists() and not temps_under(root)
    assert not (remote / "ac").exists() or not list((remote / "ac").iterdir())  # nothing published

    replacement = cluster.add_gpu_node(doomed_facts)
    try:
        hold.unlink()
        result = run_step(step, root, remote=ray_executor.run_remote)
        assert not isinstance(result, TaskFailed), result
        assert step.outputs["text"].read_text() == "HELLO RAY"
        assert read_record(root, step).info["node"] == replacement.node_id
    finally:
        cluster.cluster.remove_node(replacement)


@pytest.mark.slow
# tinycnn: torch steps, each in a fresh worker process. bert (KILN_TEST_RAY_BERT=1, ~10 minutes on 2
# cores: a cold local build and one through the cluster) is left out of the default run for time.
@pytest.mark.parametrize("model", ["sklearn_iris", "tinycnn", *(["bert"] if os.environ.get("KILN_TEST_RAY_BERT") else [])])
def test_a_model_built_through_the_cluster_is_byte_identical_to_a_local_build(cluster, remote, tmp_path, monkeypatch, model):
    # both builds in processes of their own, as people run them (a process builds one workspace: the
    # factory modules of two workspaces share names); the head connects to the test's cluster
    monkeypatch.delenv(ray_executor.ENV_EXECUTOR)
    local = example_workspace(tmp_path / "local", model)
    done = local.kiln("build", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    monkeypatch.setenv("KILN_REMOTE_CACHE", os.environ["KILN_REMOTE_CACHE"] + "-cluster")  # an empty cache: every step runs on Ray
    remote_ws = example_workspace(tmp_path / "ray", model)
    done = remote_ws.kiln("build", "-q", "-n", "4", "--executor", "ray", "--ray-address", cluster.cluster.address)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = remote_ws.ran(model)  # none was restored from a cache...
    logs = list((remote_ws.root / "build" / ".kiln" / "logs").glob("*.log"))
    assert ran and len(logs) == len(ran) == len(local.ran(model))
    assert all(p.read_text().startswith("kiln: ran on the Ray node") for p in logs)  # ...each ran on the cluster
    targets = [p.name for p in (local.root / "build" / model).iterdir() if p.is_dir()]
    assert targets
    for target in targets:
        folder = local.root / "build" / model / target
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "validation.json"):
            twin = remote_ws.root / path.relative_to(local.root)
            assert twin.read_bytes() == path.read_bytes(), f"{path.relative_to(local.root)} differs"
