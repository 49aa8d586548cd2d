"""Test-only rules for the Ray executor tests (tests/execute/test_ray_executor.py). They live in a
module of their own, not in the test file, because Ray workers import a rule's module by name
(kiln.execute.ray_executor.check_worker): the test cluster puts tests/ on the workers' PYTHONPATH.

test_ray_pretend_gpu stands in for a TensorRT rule (TensorRT cannot be installed here): its hardware
facts are those of a GPU. On a worker they are read from KILN_PRETEND_GPU (JSON), set on the pretend
GPU nodes of the cluster (which advertise the same facts as labels, as `kiln worker` does); a worker
on a node without it reports {"unavailable": ...}, so a step routed to the wrong node fails its
hardware check. On the head, as for build_tensorrt: with the cluster's GPU pool installed
(ray_executor.use_cluster_gpu_facts) its facts, through kiln.base.cuda.device_facts; else
KILN_PRETEND_GPU of the test process (a head with a pretend GPU of its own), else {"unavailable"}.

Both rules can be told to wait: while the file named by params["hold"] exists, the rule writes
params["started"] and sleeps (a node can then be killed mid-step)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from kiln.base.cuda import CudaUnavailable, device_facts, probe_source
from kiln.rules import Params, Rule, RunContext, register

PRETEND_GPU = "KILN_PRETEND_GPU"


class RayTestParams(Params):
    suffix: str = ""
    hold: str = ""  # a file: while it exists the rule waits (after writing `started`)
    started: str = ""


def _where() -> dict[str, Any]:
    import ray

    return {"node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "", "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _run(inputs: dict[str, list[Path]], outputs: dict[str, Path], params: RayTestParams) -> dict[str, Any]:
    if params.hold:
        Path(params.started).write_text("started\n")
        deadline = time.monotonic() + 120
        while Path(params.hold).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    text = "".join(p.read_text() for p in inputs["text"]).upper() + params.suffix
    for path in outputs.values():
        path.write_text(text)
    print("ray test rule ran")  # to the step's log, which comes back to the head
    return _where()


@register
class RayUpper(Rule):
    """Upper-cases its text input into every output (a portable CPU step)."""

    name = "test_ray_upper"
    version = 1
    tools = ("numpy",)
    Params = RayTestParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: RayTestParams, ctx: RunContext) -> dict[str, Any]:
        return _run(inputs, outputs, params)


@register
class RayPretendGpu(Rule):
    """Like test_ray_upper, but hardware-specific: its key holds the pretend GPU's facts."""

    name = "test_ray_pretend_gpu"
    version = 1
    tools = ("numpy",)
    Params = RayTestParams

    @classmethod
    def hardware_for(cls, params: dict[str, Any]) -> dict[str, Any]:
        if probe_source() is not None:  # the head under the Ray executor: the cluster's GPU pool
            try:
                return device_facts(0)
            except CudaUnavailable as err:
                return {"unavailable": str(err)}
        found = os.environ.get(PRETEND_GPU)
        return json.loads(found) if found else {"unavailable": "no pretend GPU on this node"}

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: RayTestParams, ctx: RunContext) -> dict[str, Any]:
        return _run(inputs, outputs, params)
