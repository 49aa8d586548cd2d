"""kiln.runtime.budget: the damage ranking and the search for the fewest layers kept."""

from __future__ import annotations

import pytest

from kiln.errors import StepError
from kiln.runtime.budget import Budget, damage, ranked, search


def test_damage_is_the_share_of_each_gate_one_layer_spends():
    goal = {"min_cosine": 0.98, "mean_cosine": 0.99, "max_abs_diff": 0.5}
    assert damage({"min_cosine": 0.99, "mean_cosine": 0.995, "max_abs_diff": 0.1}, goal) == pytest.approx(0.5 + 0.5 + 0.2)
    assert damage({"min_cosine": 0.99}, {"max_rel_diff": 1.0}) == 0.0  # a metric the gates do not name costs nothing


def test_ranking_puts_the_most_damaging_first_and_keeps_graph_order_on_ties():
    goal = {"min_cosine": 0.98}
    layers = [{"node": n, "alone": {"min_cosine": c}} for n, c in (("a", 0.999), ("b", 0.97), ("c", 0.999), ("d", 0.99))]
    assert [layer["node"] for layer in ranked(layers, goal)] == ["b", "d", "a", "c"]


class FakeRefs:
    """Measures a 'model' that is just the set of kept names: min_cosine rises with what is kept."""

    batches = []
    axes = {"inputs": {}}

    def __init__(self, gain: dict[str, float]):
        self.gain = gain


def fake_search(monkeypatch, gain: dict[str, float], goal: float):
    from kiln.runtime import budget

    calls = []

    def measure(model, kept, refs, b, step, order):
        calls.append(kept)
        value = 0.9 + sum(gain[n] for n in model)
        return budget.Trial(kept, {"min_cosine": value}, value >= goal, [] if value >= goal else [f"min_cosine {value} < {goal}"]), {0: value}

    class Kept(frozenset):
        def ByteSize(self):
            return 100 + 10 * len(self)

    monkeypatch.setattr(budget, "_measure", measure)
    monkeypatch.setattr(budget, "_latency_cost", lambda *a: {"all_quantized": 1.0, "with_fallback": 1.1})
    scanned = [{"node": n, "weight": n + ".w", "alone": {"min_cosine": 1.0 - g}} for n, g in gain.items()]

    def scan():  # the ranking is asked for lazily: it costs a model run per layer
        calls.append("scan")
        return scanned

    model, facts = search(lambda kept: Kept(kept), scan, FakeRefs(gain), Budget({"min_cosine": goal}, ["y"], ["min_cosine"]), "t/step")
    return model, facts["fallback"], calls


def test_search_finds_the_fewest_layers_in_rank_order_with_few_trials(monkeypatch):
    gain = {f"l{i}": 0.01 for i in range(8)} | {"big": 0.05, "mid": 0.02}
    model, facts, calls = fake_search(monkeypatch, gain, goal=0.98)  # needs big + mid + one more: 3 kept
    assert set(model) == {"big", "mid", "l0"} and [k["node"] for k in facts["kept"]] == ["big", "mid", "l0"]
    assert facts["passed"] and facts["bytes_cost"] == 30 and calls == [0, "scan", 1, 2, 4, 3]  # doubling, then bisection
    assert [t["kept"] for t in facts["trials"]] == [0, 1, 2, 3, 4]


def test_nothing_is_kept_and_nothing_scanned_when_the_fully_quantized_model_passes(monkeypatch):
    model, facts, calls = fake_search(monkeypatch, {"a": 0.2}, goal=0.9)
    assert model == frozenset() and facts["kept"] == [] and calls == [0] and facts["bytes_cost"] == 0


def test_a_search_allowed_to_keep_nothing_fails_after_one_scan(monkeypatch):
    from kiln.runtime import budget

    calls = []
    monkeypatch.setattr(budget, "_measure", lambda model, kept, *a: (calls.append(kept), (budget.Trial(kept, {"min_cosine": 0.5}, False, ["min_cosine 0.5 < 0.9"]), {0: 0.5}))[1])
    scanned = [{"node": "a", "weight": "a.w", "alone": {"min_cosine": 0.5}}]
    with pytest.raises(StepError, match="fail even with 0 of the 1 scanned layers kept"):
        search(lambda kept: frozenset(kept), lambda: calls.append("scan") or scanned, FakeRefs({}), Budget({"min_cosine": 0.9}, ["y"], ["min_cosine"]), "t", max_kept=0)
    assert calls == [0, "scan"]


def test_an_unreachable_goal_fails_naming_it(monkeypatch):
    with pytest.raises(StepError, match=r"fail even with 2 of the 2 scanned layers kept .*best min_cosine 0\.94 with 2 kept") as err:
        fake_search(monkeypatch, {"a": 0.02, "b": 0.02}, goal=0.99)
    assert err.value.facts["fallback"]["passed"] is False


def test_a_layer_that_gives_nan_alone_ranks_first():
    layers = [{"node": "a", "alone": {"min_cosine": 0.999}}, {"node": "b", "alone": {"min_cosine": float("nan")}}, {"node": "c", "alone": {"min_cosine": 0.95}}]
    assert [layer["node"] for layer in ranked(layers, {"min_cosine": 0.98})] == ["b", "c", "a"]
