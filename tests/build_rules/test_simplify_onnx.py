"""simplify_onnx: onnxsim on a small ONNX model; when onnxsim fails (it raises bare RuntimeErrors from
C++, e.g. on graphs it cannot sort) the step's one line says so and names the way out,
`options.simplify = false` in the target."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from kiln.build_rules.simplify_onnx import SimplifyOnnx, SimplifyOnnxParams
from kiln.errors import StepError
from kiln.rules import RunContext
from tiny_onnx import tiny_model


def simplify(tmp_path: Path) -> tuple[Path, dict]:
    source = tiny_model(tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    info = SimplifyOnnx().run({"model": [source]}, {"model": out}, SimplifyOnnxParams(), RunContext(tmp_path, "m/t/simplify_onnx"))
    return out, info


def test_simplifies_into_a_model_the_checker_accepts(tmp_path: Path):
    out, info = simplify(tmp_path)
    onnx.checker.check_model(str(out), full_check=True)
    assert info["nodes_after"] <= info["nodes_before"]


def test_an_onnxsim_failure_points_to_options_simplify(tmp_path: Path, monkeypatch):
    import onnxsim

    def refuse(model):
        raise RuntimeError("[ONNXSimplifier] Nodes in a graph must be\n topologically sorted")

    monkeypatch.setattr(onnxsim, "simplify", refuse)
    with pytest.raises(StepError) as caught:
        simplify(tmp_path)
    assert str(caught.value) == ("m/t/simplify_onnx: onnxsim failed on in.onnx: [ONNXSimplifier] Nodes in a graph must be topologically sorted; "
                                 "set options.simplify = false in the target to build it without onnxsim")
    assert not (tmp_path / "out.onnx").exists()


def test_an_unverifiable_simplification_points_to_options_simplify(tmp_path: Path, monkeypatch):
    import onnxsim

    monkeypatch.setattr(onnxsim, "simplify", lambda model: (model, False))
    with pytest.raises(StepError, match="could not check the simplified model against the original; set options.simplify = false"):
        simplify(tmp_path)
