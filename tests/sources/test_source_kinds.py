"""kiln.sources: the registry of source kinds and what each kind does at run time.

The registry (SOURCES): order (the manifest's [source] union), tags, the per-kind switches
(framework, tokenizes_text, simplify_onnx) and reference tools; the torch calling convention
(load_torch_model: inputs positionally or by name, a tuple of the named outputs, eval mode); each
kind's reference run (ONNX in onnxruntime, scikit-learn estimators shaped like the manifest's
outputs). Resolving a [source] table is tested in tests/test_sources.py.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln.sources
from kiln.build_rules.reference_outputs import ReferenceOutputs
from kiln.errors import StepError
from kiln.rules import RunContext
from kiln.schema.fields import Strict
from kiln.sources import SOURCES, _check_registry, load_torch_model, model_and_example, source_kind, torch_kind
from kiln.sources.base import REFERENCE_TOOLS, SourceKind
from kiln.sources.huggingface import HuggingFace
from kiln.sources.sklearn import estimator_results

KINDS = ("huggingface", "torch", "onnx", "sklearn", "tensorflow", "xgboost", "lightgbm")


# ---- the registry -----------------------------------------------------------------------------


def test_the_registry_lists_every_kind_in_the_manifest_union_order():
    from kiln.define.spec import Source

    assert tuple(kind.kind for kind in SOURCES) == KINDS
    assert typing.get_args(typing.get_args(Source)[0]) == tuple(kind.Source for kind in SOURCES)
    assert all(source_kind(name).kind == name for name in KINDS)


@pytest.mark.parametrize("kind", SOURCES, ids=KINDS)
def test_each_source_table_is_tagged_with_its_kind(kind: SourceKind):
    assert typing.get_args(kind.Source.model_fields["kind"].annotation) == (kind.kind,)


def test_what_each_kind_can_do():
    switches = {kind.kind: (kind.framework, kind.tokenizes_text, kind.simplify_onnx) for kind in SOURCES}
    assert switches == {
        "huggingface": ("torch", True, True),
        "torch": ("torch", False, True),
        "onnx": (None, False, True),
        "sklearn": ("sklearn", False, False),  # onnxsim does not know the ai.onnx.ml domain
        "tensorflow": ("tensorflow", False, True),
        "xgboost": ("xgboost", False, False),  # ai.onnx.ml tree operators
        "lightgbm": ("lightgbm", False, False),
    }


@pytest.mark.parametrize("kind", SOURCES, ids=KINDS)
def test_the_reference_step_is_keyed_by_the_kind_reference_tools(kind: SourceKind):
    expected = {"sklearn": (*REFERENCE_TOOLS, "scikit-learn"), "tensorflow": (*REFERENCE_TOOLS, "tensorflow", "tensorflow-cpu", "keras"),
                "xgboost": (*REFERENCE_TOOLS, "xgboost", "xgboost-cpu"), "lightgbm": (*REFERENCE_TOOLS, "lightgbm")}.get(kind.kind, REFERENCE_TOOLS)
    assert kind.reference_tools == expected
    assert ReferenceOutputs.tools_for({"source": {"kind": kind.kind}}) == expected


def test_torch_kind_refuses_a_source_that_is_no_module():
    assert torch_kind({"kind": "torch"}).kind == "torch"
    with pytest.raises(TypeError, match="source kind 'onnx' is not a torch.nn.Module"):
        torch_kind({"kind": "onnx"})


def test_a_kind_tagged_with_another_name_fails_the_registry_check(monkeypatch):
    class OtherSource(Strict):
        kind: Literal["other"]

    class Mistagged(SourceKind):
        kind = "mine"
        Source = OtherSource
        files = onnx_step = run_reference = None

    monkeypatch.setattr(kiln.sources, "SOURCES", (*SOURCES, Mistagged()))
    monkeypatch.setattr(kiln.sources, "_BY_KIND", {k.kind: k for k in kiln.sources.SOURCES})
    with pytest.raises(RuntimeError, match="Mistagged.Source is not tagged kind = 'mine'"):
        _check_registry()


# ---- torch: the calling convention ------------------------------------------------------------

FACTORY = '''
import torch


class Net(torch.nn.Module):
    """forward(a, b) -> {"scores": net(a) * b, "hidden": net(a)}; dropout shows train vs eval."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.9), torch.nn.Linear(4, 2))

    def forward(self, a, b):
        hidden = self.net(a)
        return {"scores": hidden * b, "hidden": hidden}


def build():
    return Net()  # in train mode, as a factory usually returns it


def not_a_module():
    return "a string"
'''


@pytest.fixture
def factory(tmp_path: Path):
    """kiln_test_factory.py in tmp_path; forgotten by the import system afterwards."""
    name = "kiln_test_factory"
    sys.modules.pop(name, None)
    module_file = tmp_path / f"{name}.py"
    module_file.write_text(FACTORY)
    yield name, module_file
    sys.modules.pop(name, None)


def _torch_source(factory, function: str = "build", **more) -> tuple[dict, list[Path]]:
    name, module_file = factory
    return {"kind": "torch", "factory": f"{name}:{function}", **more}, [module_file]


def test_a_factory_module_takes_inputs_positionally_and_returns_the_named_outputs(tmp_path: Path, factory):
    source, files = _torch_source(factory)
    model = load_torch_model(source, files, ["a", "b"], ["hidden", "scores"], tmp_path)
    assert not model.training and not model.model.training  # eval mode: dropout off
    a, b = torch.randn(5, 3), torch.full((5, 2), 2.0)
    with torch.no_grad():
        first, again = model(a, b), model(a, b)
    assert isinstance(first, tuple) and len(first) == 2
    hidden, scores = first
    assert torch.equal(scores, hidden * 2) and torch.equal(first[0], again[0])  # (hidden, scores) in the asked order
    with torch.no_grad():
        (only,) = load_torch_model(source, files, ["a", "b"], ["scores"], tmp_path)(a, b)
    assert torch.equal(only, scores)


def test_a_factory_weights_file_is_loaded(tmp_path: Path, factory):
    from safetensors.torch import save_file

    plain, files = _torch_source(factory)
    zero = {k: torch.zeros_like(v) for k, v in load_torch_model(plain, files, ["a", "b"], ["hidden"], tmp_path).model.state_dict().items()}
    source = {**plain, "weights": "w.safetensors"}
    zero["net.2.bias"] = torch.tensor([1.5, -2.5])
    save_file(zero, str(tmp_path / "w.safetensors"))
    model = load_torch_model(source, [*files, tmp_path / "w.safetensors"], ["a", "b"], ["hidden"], tmp_path)
    with torch.no_grad():
        (hidden,) = model(torch.randn(3, 3), torch.ones(3, 2))
    assert hidden.tolist() == [[1.5, -2.5]] * 3


def test_a_factory_that_returns_no_module_is_a_step_error(tmp_path: Path, factory):
    source, files = _torch_source(factory, "not_a_module")
    with pytest.raises(StepError) as caught:
        load_torch_model(source, files, ["a"], ["y"], tmp_path)
    assert str(caught.value) == "source: kiln_test_factory:not_a_module returned str, not a torch.nn.Module"


def test_the_export_example_is_seeded_tensors_in_manifest_order(tmp_path: Path, factory):
    source, files = _torch_source(factory)
    inputs = [{"name": "a", "dtype": "float32", "shape": ["batch", 3]}, {"name": "b", "dtype": "float32", "shape": ["batch", 2]}]
    model, args = model_and_example(source, files, inputs, [{"name": "scores"}], tmp_path)
    assert [tuple(t.shape) for t in args] == [(2, 3), (2, 2)] and all(t.dtype == torch.float32 for t in args)
    _, again = model_and_example(source, files, inputs, [{"name": "scores"}], tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(args, again))
    with torch.no_grad():
        assert len(model(*args)) == 1


def test_a_huggingface_model_takes_the_inputs_by_name(tmp_path: Path, monkeypatch):
    """transformers models are called forward(input_ids=..., attention_mask=...): the wrapper turns
    the positional manifest order into keywords, whatever the forward's own parameter order."""

    class Bert(torch.nn.Module):
        def forward(self, attention_mask=None, token_type_ids=None, input_ids=None):
            return {"last_hidden_state": input_ids * 10 + attention_mask}

    monkeypatch.setattr(HuggingFace, "load_module", lambda self, source, files, root: Bert())
    model = load_torch_model({"kind": "huggingface", "path": "m"}, [tmp_path / "config.json"], ["input_ids", "attention_mask"],
                             ["last_hidden_state"], tmp_path)
    (out,) = model(torch.tensor([[1, 2]]), torch.tensor([[1, 0]]))
    assert out.tolist() == [[11, 20]]


def test_the_torch_reference_run_yields_numpy_outputs_per_batch(tmp_path: Path, factory):
    source, files = _torch_source(factory)
    inputs = [{"name": "a", "dtype": "float32"}, {"name": "b", "dtype": "float32"}]
    feeds = [{"b": np.ones((n, 2), np.float32), "a": np.ones((n, 3), np.float32)} for n in (4, 1)]
    got = list(source_kind("torch").run_reference(iter(feeds), files, source, inputs, [{"name": "scores"}, {"name": "hidden"}],
                                                 RunContext(tmp_path, "m/reference_outputs")))
    assert [feed for feed, _ in got] == feeds
    assert [sorted(out) for _, out in got] == [["hidden", "scores"]] * 2
    assert [out["scores"].shape for _, out in got] == [(4, 2), (1, 2)] and isinstance(got[0][1]["scores"], np.ndarray)
    assert np.array_equal(got[0][1]["scores"], got[0][1]["hidden"])  # b is ones


# ---- onnx -------------------------------------------------------------------------------------


def test_the_onnx_reference_run_yields_the_model_outputs_per_batch(tmp_path: Path):
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["neg"]), helper.make_node("Mul", ["x", "x"], ["square"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("square", TensorProto.FLOAT, ["batch", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    feeds = [{"x": np.array([[1, 2], [3, 4]], np.float32)}, {"x": np.array([[-5, 0.5]], np.float32)}]
    got = list(source_kind("onnx").run_reference(iter(feeds), [tmp_path / "m.onnx"], {"kind": "onnx", "path": "m.onnx"},
                                                [{"name": "x"}], [{"name": "square"}], RunContext(tmp_path, "s")))
    assert [feed for feed, _ in got] == feeds
    assert [out["square"].tolist() for _, out in got] == [[[1, 4], [9, 16]], [[25, 0.25]]]
    assert all(list(out) == ["square"] for _, out in got)


# ---- sklearn ----------------------------------------------------------------------------------

_X = np.array([[0.0, 0.1], [0.2, 0.0], [5.0, 5.1], [5.2, 4.9], [0.1, 0.3], [4.8, 5.0]], np.float32)
_LABELS = np.array([0, 0, 1, 1, 0, 1])


def test_a_classifier_gives_labels_then_probabilities():
    from sklearn.linear_model import LogisticRegression

    labels, probabilities = estimator_results(LogisticRegression().fit(_X, _LABELS), _X)
    assert labels.tolist() == _LABELS.tolist() and probabilities.shape == (6, 2) and np.allclose(probabilities.sum(1), 1)


def test_a_regressor_gives_one_output():
    from sklearn.linear_model import LinearRegression

    (predictions,) = estimator_results(LinearRegression().fit(_X, _X[:, 0] * 2), _X)
    assert predictions.shape == (6,) and np.allclose(predictions, _X[:, 0] * 2, atol=1e-4)


def test_a_clusterer_gives_labels_then_distances_and_a_transformer_its_output():
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    labels, distances = estimator_results(KMeans(2, n_init=1, random_state=0).fit(_X), _X)
    assert labels.shape == (6,) and distances.shape == (6, 2)
    (scaled,) = estimator_results(StandardScaler().fit(_X), _X)
    assert np.allclose(scaled.mean(0), 0, atol=1e-6)


SKLEARN_FACTORY = '''
import numpy as np
from sklearn.linear_model import LinearRegression, LogisticRegression

X = np.array([[0.0, 0.1], [0.2, 0.0], [5.0, 5.1], [5.2, 4.9]])


def regressor():
    return LinearRegression().fit(X, X[:, 0] * 3 + 1)


def classifier():
    return LogisticRegression().fit(X, [0, 0, 1, 1])
'''


@pytest.fixture
def estimators(tmp_path: Path):
    name = "kiln_test_estimators"
    sys.modules.pop(name, None)
    (tmp_path / f"{name}.py").write_text(SKLEARN_FACTORY)
    yield name, tmp_path / f"{name}.py"
    sys.modules.pop(name, None)


def _sklearn_reference(estimators, function: str, outputs: list[dict], root: Path) -> list[tuple[dict, dict]]:
    name, module_file = estimators
    feeds = [{"features": np.array([[1.0, 0.0], [2.0, 7.0], [0.0, 0.0]], np.float32)}, {"features": np.array([[4.0, 4.0]], np.float32)}]
    return list(source_kind("sklearn").run_reference(iter(feeds), [module_file], {"kind": "sklearn", "factory": f"{name}:{function}"},
                                                    [{"name": "features", "dtype": "float32", "shape": ["batch", 2]}], outputs,
                                                    RunContext(root, "m/reference_outputs")))


def test_a_regressor_reference_is_shaped_like_the_declared_column(tmp_path: Path, estimators):
    got = _sklearn_reference(estimators, "regressor", [{"name": "variable", "dtype": "float32", "shape": ["batch", 1]}], tmp_path)
    first, second = (out["variable"] for _, out in got)
    assert first.shape == (3, 1) and second.shape == (1, 1) and first.dtype == np.float32
    assert np.allclose(first[:, 0], [4.0, 7.0, 1.0], atol=1e-4) and np.allclose(second, [[13.0]], atol=1e-4)


def test_a_regressor_reference_without_a_declared_shape_stays_flat(tmp_path: Path, estimators):
    got = _sklearn_reference(estimators, "regressor", [{"name": "variable", "dtype": "float64"}], tmp_path)
    assert got[0][1]["variable"].shape == (3,) and got[0][1]["variable"].dtype == np.float64


def test_a_classifier_reference_gives_labels_and_probabilities_in_the_declared_dtypes(tmp_path: Path, estimators):
    outputs = [{"name": "label", "dtype": "int64", "shape": ["batch"]}, {"name": "probabilities", "dtype": "float32", "shape": ["batch", 2]}]
    (_, out), _ = _sklearn_reference(estimators, "classifier", outputs, tmp_path)
    assert list(out) == ["label", "probabilities"]
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [0, 1, 0]
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (3, 2)
    assert out["probabilities"].flags.c_contiguous


def test_more_declared_outputs_than_the_estimator_gives_is_a_step_error(tmp_path: Path, estimators):
    outputs = [{"name": "variable", "dtype": "float32"}, {"name": "extra", "dtype": "float32"}]
    with pytest.raises(StepError) as caught:
        _sklearn_reference(estimators, "regressor", outputs, tmp_path)
    assert str(caught.value) == "m/reference_outputs: LinearRegression gives 1 outputs but the manifest declares 2: ['variable', 'extra']"
