"""options.fallback = "auto": quantize, measure the target's own gates on the validation data exactly
as validation will, and when they fail keep the most damaging layers in higher precision, fewest
first, until they pass. The damage ranking comes from the per-layer scan (kiln.runtime.scan: each
layer quantized alone), made only once the all-quantized model has failed the gates (most targets
pass fully quantized, and then pay no scan); the search then re-measures the real quantized model at
every count, since the effects of several layers neither add up nor stay in order.

The count is searched by doubling (0, 1, 2, 4, ...) until the gates pass, then bisection down to the
smallest passing count: about 2 log2(N) real quantizations of an N-layer model rather than N. A
trial runs the batches that hurt most first and stops at the first one failing a min / max gate
(ReferenceSet.measure): most trials fail, and they fail there (bert's int4 search: 39 -> 18 s). That
is exact when keeping more layers never hurts, which holds in the mean; where it does not, the
result passes all the same (every kept count is measured), and may keep a layer or two more than a
layer-by-layer walk would.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kiln.base.quiet import alone
from kiln.errors import StepError
from kiln.runtime.onnxrt import session
from kiln.runtime.reference import ReferenceSet, session_runner, worst_over_outputs
from kiln.runtime.runners import timed
from kiln.runtime.scan import LazyScan, ScanHooks, settings_from

if TYPE_CHECKING:
    from kiln.rules import RunContext


# What a quantize step with options.fallback = "auto" reserves beyond its own needs: the scan's copy
# of the model and its sessions, beside the step's quantized models (the scan_layers step's own base).
SCAN_MEMORY_MIB = 1024


def fallback_memory_mib(params: dict[str, Any]) -> int:
    """MiB a quantize rule's memory_mib adds for its fallback (nothing without one)."""
    return SCAN_MEMORY_MIB if params.get("fallback") else 0


@dataclass
class Budget:
    """What the search aims at: the target's gates (its effective thresholds, as validate gets them)
    over the validated outputs, with the validation settings the metrics depend on."""

    goal: dict[str, float]
    outputs: list[str]
    metrics: list[str]
    padding_mask: str | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Budget":
        return cls(goal={k: v for k, v in params["goal"].items() if v is not None}, outputs=list(params["outputs"]),
                   metrics=list(params["metrics"]), padding_mask=params.get("padding_mask"))


def damage(alone: dict[str, float], goal: dict[str, float]) -> float:
    """How much of the budget one layer quantized alone uses up, summed over the gated metrics:
    a cosine gate g spends (1 - cos) / (1 - g), a difference gate d spends diff / d. 1.0 means
    that layer alone would take a metric to its gate."""
    import math

    spent = 0.0
    for metric, limit in goal.items():
        if metric not in alone:
            continue
        if not math.isfinite(alone[metric]):
            return math.inf  # NaN or Inf with this layer alone quantized: the most damaging there is
        if metric.endswith("cosine"):
            spent += (1.0 - alone[metric]) / max(1.0 - limit, 1e-12)
        else:
            spent += alone[metric] / max(limit, 1e-12)
    return spent


def ranked(scanned: list[dict], goal: dict[str, float]) -> list[dict]:
    """The scanned layers, most damaging first (ties: graph order, so the order is reproducible)."""
    return sorted(scanned, key=lambda layer: -damage(layer["alone"], goal))


@dataclass
class Trial:
    kept: int
    worst: dict[str, float]
    passed: bool
    failed: list[str] = field(default_factory=list)
    complete: bool = True  # False: stopped at the first batch that failed a gate (worst is over the batches run)


def within_budget(quantize: Callable[[list[str]], Any], inputs: dict[str, list[Path]], fallback: dict[str, Any] | None, ctx: RunContext,
                  kept_as: str = "float", max_kept: int | None = None, hooks: ScanHooks | None = None) -> tuple[Any, dict[str, Any]]:
    """A quantize step's model and facts: quantize([]) when the target has no fallback, else the
    search below on the reference file (inputs "reference"), over the ranking of the per-layer scan
    (fallback["scan"]: its settings; hooks: the rule's own pieces it quantizes a layer with), which
    runs only if the all-quantized model fails. facts["fallback"]["scan"] says whether it ran."""
    if not fallback:
        return quantize([]), {}
    budget = Budget.from_params(fallback)
    scanned = LazyScan(inputs, settings_from(fallback, ctx.step), ctx, hooks or ScanHooks())
    refs = ReferenceSet(inputs["reference"][0], budget.outputs, budget.padding_mask, ctx.step)
    try:
        model, facts = search(quantize, scanned, refs, budget, ctx.step, ctx.progress, max_kept, ctx.root)
    except StepError as err:
        if isinstance(err.facts.get("fallback"), dict):  # a search that failed: the report says what it scanned too
            err.facts["fallback"]["scan"] = scanned.facts()
        raise
    facts["fallback"]["kept_as"] = kept_as  # what "kept" means: float, or int4's 8-bit blocks
    facts["fallback"]["scan"] = scanned.facts()
    return model, facts


def search(quantize: Callable[[list[str]], Any], scanned: Callable[[], list[dict]], refs: Any, budget: Budget, step: str,
           progress: Callable[[int, int | None], None] | None = None, max_kept: int | None = None, root: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """(the quantized model that passes with the fewest layers kept, the facts for the report).
    quantize(kept): the rule's own quantization with those node names kept in higher precision,
    a fresh ModelProto each call. scanned(): the scanned layers ({"node", "weight", "alone"}), asked
    for only when the all-quantized model fails. refs: a kiln.runtime.reference.ReferenceSet of the
    whole validation data. max_kept: at most this many kept (int8 keeps one layer quantized, else it
    is an fp32 model). Fails the step when even keeping that many misses the gates."""
    order: list[dict] = []
    names: list[str] = []  # the ranked node names, once the scan has run
    trials: dict[int, Trial] = {}
    models: dict[int, Any] = {}
    hardest: list[int] = []  # batch indices, worst first in the all-quantized model: later trials run them first
    started = time.perf_counter()

    def attempt(k: int) -> bool:
        model = quantize(names[:k])
        trials[k], batch_worst = _measure(model, k, refs, budget, step, hardest)
        if k == 0:
            models[0] = model  # the all-quantized model: the fallback's cost is measured against it
            hardest.extend(sorted(batch_worst, key=lambda i: (batch_worst[i], i)))
        if trials[k].passed:
            for count in [c for c in models if c]:
                del models[count]  # only the smallest passing model is kept in memory
            models[k] = model
        if progress is not None:
            progress(len(trials), None)
        return trials[k].passed

    low, high = -1, None  # the largest count known to fail, the smallest known to pass
    scan_seconds = 0.0
    if attempt(0):
        high = 0
    else:
        low = 0
        scan_started = time.perf_counter()
        order = ranked(scanned(), budget.goal)
        scan_seconds = time.perf_counter() - scan_started  # reported by the scan itself, not as search time
        names.extend(layer["node"] for layer in order)
    top = len(names) if max_kept is None else max(0, min(max_kept, len(names)))
    k = 0
    while high is None and k != top:  # doubling: 1, 2, 4, ... up to top
        k = min(top, max(1, 2 * k))
        if attempt(k):
            high = k
        else:
            low = k
    if high is None:
        best = max(trials.values(), key=lambda t: t.worst.get("min_cosine", 0.0))
        raise StepError(step, f"options.fallback = \"auto\": the gates fail even with {top} of the {len(names)} scanned layers kept "
                              f"in higher precision ({'; '.join(trials[top].failed)}; best min_cosine {'' if best.complete else 'at most '}{best.worst.get('min_cosine', float('nan')):.6g} "
                              f"with {best.kept} kept): the error left is outside the scanned layers (embeddings, other ops) or in the "
                              f"kept precision itself; loosen the gates, or set options.embeddings = \"fp32\"",
                        facts={"fallback": _facts(order, trials, None, budget, started, scan_seconds)})
    while high - low > 1:
        mid = (low + high) // 2
        if attempt(mid):
            high = mid
        else:
            low = mid
    chosen = models[high]
    facts = _facts(order, trials, high, budget, started, scan_seconds)
    facts["bytes_cost"] = chosen.ByteSize() - models[0].ByteSize() if high else 0
    facts["latency_ms"] = _latency_cost(models[0], chosen, refs, root) if high else None
    return chosen, {"fallback": facts}


def _measure(model, kept: int, refs: Any, budget: Budget, step: str, order: list[int]) -> tuple[Trial, dict[int, float]]:
    """The gate metrics of `model` on the validation data, computed as validate computes them (one
    thread, the same session settings): a count that passes here passes there. The batches that
    hurt most so far run first and a failed min / max gate stops the trial there: a count that fails
    usually fails on them, in a fraction of the data (bert's int4 search: 6 of 9 trials failing)."""
    from kiln.runtime.metrics import failures

    with _session(model) as sess:
        measured = refs.measure(session_runner(sess, budget.outputs, step), budget.metrics, stop_on=budget.goal, order=order)
    failed = failures(measured.metrics, budget.goal)
    return Trial(kept, worst_over_outputs(measured.metrics), not failed, failed, measured.complete), measured.batch_worst


class _session:
    """An onnxruntime session of an in-memory model, as validation opens the written file. A model
    over protobuf's 2 GB limit goes through a temporary file with its tensors beside it."""

    def __init__(self, model):
        self.model = model
        self.tmp = None

    def __enter__(self):

        if self.model.ByteSize() < (1 << 31) - (1 << 24):
            return session(self.model.SerializeToString())
        import onnx

        self.tmp = tempfile.TemporaryDirectory(prefix=".kiln-budget-")
        path = Path(self.tmp.name) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(self.model)  # saving with external data empties the proto's tensors: not the caller's
        onnx.save(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        return session(path)

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()


def _latency_cost(all_quantized, chosen, refs: Any, root: Path | None = None) -> dict[str, Any] | None:
    """Latency (median ms, 2 threads, the first validation sample) of the all-quantized model and of
    the one with the fallback, measured in the same process one after the other; "alone": whether
    no other step of the build ran meanwhile (kiln.base.quiet: steps run side by side by default, and
    a neighbour's load makes both numbers, and their ratio, noisier)."""
    from kiln.runtime.data import first_sample

    if not refs.batches or chosen.ByteSize() >= (1 << 31) - (1 << 24):
        return None
    feed = first_sample(refs.batches[0][0], refs.axes["inputs"])
    result: dict[str, Any] = {}
    with alone(root) if root is not None else contextlib.nullcontext(True) as quiet:
        for label, model in (("all_quantized", all_quantized), ("with_fallback", chosen)):
            sess = session(model.SerializeToString(), threads=2, spinning=False)
            shaped = {i.name: feed[i.name] for i in sess.get_inputs()}
            result[label] = timed(lambda sess=sess, shaped=shaped: sess.run(None, shaped), shaped, 30, 2)["median_ms"]
    result["alone"] = bool(quiet)
    return result


def _facts(order: list[dict], trials: dict[int, Trial], kept: int | None, budget: Budget, started: float, scan_seconds: float) -> dict[str, Any]:
    final = trials.get(kept) if kept is not None else None
    return {
        "goal": budget.goal, "passed": final is not None,
        "kept": [{"node": layer["node"], "weight": layer["weight"], "alone": layer["alone"],
                  "damage": round(damage(layer["alone"], budget.goal), 4)} for layer in order[: kept or 0]],
        "trials": [{"kept": t.kept, **t.worst, "passed": t.passed} | ({} if t.complete else {"stopped_early": True})
                   for _, t in sorted(trials.items())],
        "search_seconds": round(time.perf_counter() - started - scan_seconds, 2),
    }
