"""convert_fp16: onnxruntime's float16 converter, with the graph sorted so that the published model
passes onnx's full checker (the converter appends the Casts of fp32 inputs at the end of the list)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import tiny_onnx
from kiln.rules import RunContext, get_rule
from kiln.runtime.onnxrt import session


def convert(tmp_path: Path, name: str = "fp16.onnx", source: Path | None = None, **params) -> tuple[Path, dict]:
    rule = get_rule("convert_fp16")
    source = source or tiny_onnx.tiny_model(tmp_path / "fp32.onnx")
    out = tmp_path / name
    facts = rule().run({"model": [source]}, {"model": out}, rule.Params(**params), RunContext(tmp_path, "test/convert_fp16"))
    return out, facts


def test_the_converters_own_output_is_unsorted(tmp_path):
    """Why the rule sorts: without it, the fp16 model of any float-input model fails the checker."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(tiny_onnx.tiny_model(tmp_path / "fp32.onnx"))), keep_io_types=True)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(converted, full_check=True)


@pytest.mark.parametrize("keep_io_types", [True, False], ids=["fp32_io", "fp16_io"])
def test_the_fp16_model_passes_the_full_checker_and_computes_the_same_function(tmp_path, keep_io_types):
    out, facts = convert(tmp_path, keep_io_types=keep_io_types)
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(2).standard_normal((3, 4, tiny_onnx.K)).astype(np.float32)
    (got,) = session(out).run(["Y"], {"X": x if keep_io_types else x.astype(np.float16)})
    (want,) = session(tmp_path / "fp32.onnx").run(["Y"], {"X": x})
    assert got.dtype == (np.float32 if keep_io_types else np.float16)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-2)
    assert facts["nodes"] == len(onnx.load(str(out)).graph.node)


def test_only_the_input_casts_move_and_the_bytes_are_reproducible(tmp_path):
    a, _ = convert(tmp_path, "a.onnx")
    b, _ = convert(tmp_path, "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    ops = [n.op_type for n in onnx.load(str(a)).graph.node]
    source_ops = [n.op_type for n in onnx.load(str(tmp_path / "fp32.onnx")).graph.node]
    assert ops[0] == "Cast" and ops[1:len(source_ops) + 1] == source_ops and ops[len(source_ops) + 1:] == ["Cast"]


def test_a_branch_model_is_converted_and_checked_too(tmp_path):
    out, _ = convert(tmp_path, source=tiny_onnx.branch_model(tmp_path / "branch.onnx"))
    onnx.checker.check_model(str(out), full_check=True)
