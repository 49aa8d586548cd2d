"""A corpus of malformed manifests and data files, each run through a real `doit build` of a
workspace that already holds a good build: each gives one line naming the file and the key (or
tensor) at fault (and, for a failed step, its log), no traceback, exits non-zero, and leaves the
workspace and the earlier artifacts as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from workspaces import tiny_workspace

GOOD_DATA = np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32)


def manifest(old: str, new: str):
    def change(ws):
        ws.edit(old, new, name="tiny")
    return change


def append(text: str):
    def change(ws):
        path = ws.manifest("tiny")
        path.write_text(path.read_text() + "\n" + text + "\n")
    return change


def data(writer):
    def change(ws):
        writer(ws.root / "manifests/data/tiny.npz")
    return change


def factory(code: str):
    def change(ws):
        (ws.root / "tinynet.py").write_text(code)
    return change


NAN_NET = "import torch\n\ndef build():\n    class N(torch.nn.Module):\n        def forward(self, x):\n            return x[:, :3] * float('nan')\n    return N()\n"
NOT_A_MODULE = "def build():\n    return 42\n"

# (case id, change, exit code, texts the one error line must hold: the file, then the key or tensor)
CASES = [
    # TOML syntax
    ("toml-unclosed-table", manifest("[targets.onnx_a]", "[targets.onnx_a"), 2, ["tiny.toml", "TOML syntax error"]),
    ("toml-duplicate-key", manifest('opset = 17\n\n[targets.onnx_b]', 'opset = 17\nopset = 18\n\n[targets.onnx_b]'), 2, ["tiny.toml", "TOML syntax error"]),
    ("toml-unterminated-string", manifest('name = "tiny"', 'name = "tiny'), 2, ["tiny.toml", "TOML syntax error"]),
    ("toml-not-utf8", lambda ws: ws.manifest("tiny").write_bytes(ws.manifest("tiny").read_bytes() + b"\n# \xff\xfe\n"), 2, ["tiny.toml", "not UTF-8"]),
    # wrong types and values
    ("opset-string", manifest("opset = 17\n\n[targets.onnx_b]", 'opset = "17"\n\n[targets.onnx_b]'), 2, ["tiny.toml", "targets.onnx_a.opset", "'17'"]),
    ("opset-too-new", manifest("opset = 17\n\n[targets.onnx_b]", "opset = 99\n\n[targets.onnx_b]"), 2, ["tiny.toml", "targets.onnx_a.opset", "99"]),
    ("batch-size-negative", manifest("batch_size = 16", "batch_size = -1"), 2, ["tiny.toml", "validation.batch_size", "-1"]),
    ("shape-not-a-list", manifest('shape = ["batch", 6]', 'shape = "batch"'), 2, ["tiny.toml", "inputs[0].shape"]),
    ("shape-zero", manifest('shape = ["batch", 6]', 'shape = ["batch", 0]'), 2, ["tiny.toml", "inputs[0].shape"]),
    ("dtype-unknown", manifest('dtype = "float32"', 'dtype = "float128"'), 2, ["tiny.toml", "inputs[0].dtype", "float128"]),
    ("threshold-out-of-range", append("[validation.thresholds]\nmin_cosine = 2.0"), 2, ["tiny.toml", "validation.thresholds.min_cosine", "2.0"]),
    ("metric-unknown", manifest("batch_size = 16", 'batch_size = 16\nmetrics = ["cos"]'), 2, ["tiny.toml", "validation.metrics", "cos"]),
    ("simplify-not-bool", manifest("options = { simplify = false }", 'options = { simplify = "no" }'), 2, ["tiny.toml", "targets.onnx_b.options.simplify"]),
    ("bad-model-name", manifest('name = "tiny"', 'name = "../tiny"'), 2, ["tiny.toml", "model.name"]),
    ("bad-tensor-name", manifest('name = "features"', 'name = "feat ures"'), 2, ["tiny.toml", "inputs[0].name"]),
    ("duplicate-input", manifest('[[outputs]]', '[[inputs]]\nname = "features"\n\n[[outputs]]'), 2, ["tiny.toml", "inputs[1].name", "features"]),
    # unknown keys
    ("unknown-top-level", append("[validaton]\ndata = 'x'"), 2, ["tiny.toml", "validaton", "unknown key"]),
    ("unknown-target-key", manifest("opset = 17\n\n[targets.onnx_b]", "opset = 17\noptimise = true\n\n[targets.onnx_b]"), 2, ["tiny.toml", "targets.onnx_a.optimise", "unknown key"]),
    ("unknown-source-key", manifest('factory = "tinynet:build"', 'factory = "tinynet:build"\nweight = "w.safetensors"'), 2, ["tiny.toml", "source.weight", "unknown key"]),
    ("unknown-option", manifest("options = { simplify = false }", "options = { simplfy = false }"), 2, ["tiny.toml", "targets.onnx_b.options.simplfy", "unknown key"]),
    # format / precision / option combinations
    ("format-unknown", manifest('format = "onnx"\nopset = 17\n\n[targets.onnx_b]', 'format = "ncnn"\nopset = 17\n\n[targets.onnx_b]'), 2, ["tiny.toml", "targets.onnx_a.format", "ncnn"]),
    ("precision-unknown", manifest("opset = 17\n\n[targets.onnx_b]", 'opset = 17\nprecision = "int3"\n\n[targets.onnx_b]'), 2, ["tiny.toml", "targets.onnx_a.precision", "int3"]),
    ("safetensors-int8", append('[targets.w]\nformat = "safetensors"\nprecision = "int8"'), 2, ["tiny.toml", "targets.w.precision", "int8"]),
    ("torchscript-fp16", append('[targets.ts]\nformat = "torchscript"\nprecision = "fp16"'), 2, ["tiny.toml", "targets.ts.precision", "fp16"]),
    ("openvino-int4", append('[targets.ov]\nformat = "openvino"\nprecision = "int4"'), 2, ["tiny.toml", "targets.ov.precision", "int4"]),
    ("block-size-on-fp32", append('[targets.q]\nformat = "onnx"\noptions = { block_size = 64 }'), 2, ["tiny.toml", "targets.q.options.block_size", "int4"]),
    ("static-without-calibration", append('[targets.q]\nformat = "onnx"\nprecision = "int8"\noptions = { quantization = "static" }'), 2, ["tiny.toml", "targets.q.options.quantization", "[calibration]"]),
    ("tensorrt-without-profile", append('[targets.trt]\nformat = "tensorrt"'), 2, ["tiny.toml", "targets.trt.profile", "batch"]),
    ("no-targets", lambda ws: ws.manifest("tiny").write_text(ws.manifest("tiny").read_text().split("[targets.onnx_a]")[0] + '[validation]\ndata = "data/tiny.npz"\n'), 2, ["tiny.toml", "targets"]),
    ("padding-mask-not-an-input", manifest("batch_size = 16", 'batch_size = 16\npadding_mask = "mask"'), 2, ["tiny.toml", "validation.padding_mask", "mask"]),
    ("validation-output-unknown", manifest("batch_size = 16", 'batch_size = 16\noutputs = ["logits"]'), 2, ["tiny.toml", "validation.outputs", "logits"]),
    # missing or unusable files
    ("data-missing", manifest('data = "data/tiny.npz"', 'data = "data/none.npz"'), 2, ["tiny.toml", "validation.data", "none.npz", "does not exist"]),
    ("data-is-a-folder", manifest('data = "data/tiny.npz"', 'data = "data"'), 2, ["tiny.toml", "validation.data", "not a file"]),
    ("data-wrong-kind", lambda ws: ((ws.root / "manifests/data/tiny.parquet").write_text("1,2\n"), ws.edit('data = "data/tiny.npz"', 'data = "data/tiny.parquet"', name="tiny")), 2, ["tiny.toml", "validation.data", ".npz, .npy or .csv"]),
    ("text-data-without-tokenizer", manifest('data = "data/tiny.npz"', 'data = "data/sentences.txt"'), 2, ["tiny.toml", "validation.data", "tokenizer"]),
    ("factory-module-missing", manifest('factory = "tinynet:build"', 'factory = "nonet:build"'), 2, ["tiny.toml", "source.factory", "nonet"]),
    ("weights-missing", manifest('factory = "tinynet:build"', 'factory = "tinynet:build"\nweights = "w.safetensors"'), 2, ["tiny.toml", "source.weights", "does not exist"]),
    ("weights-pickle", lambda ws: ((ws.root / "manifests/w.pt").write_bytes(b"\x80\x04"), ws.edit('factory = "tinynet:build"', 'factory = "tinynet:build"\nweights = "w.pt"', name="tiny")), 2, ["tiny.toml", "source.weights", "pickle"]),
    ("data-outside-workspace", manifest('data = "data/tiny.npz"', 'data = "/etc/hostname"'), 2, ["tiny.toml", "validation.data", "outside the workspace"]),
    # empty, ragged or wrong data (the step fails: exit 1)
    ("data-empty-file", data(lambda p: p.write_bytes(b"")), 1, ["tiny.npz", "cannot read arrays"]),
    ("data-not-npz", data(lambda p: p.write_bytes(b"PK\x03\x04 not really a zip")), 1, ["tiny.npz", "cannot read arrays"]),
    ("data-zero-samples", data(lambda p: np.savez(p, features=np.zeros((0, 6), np.float32))), 1, ["tiny.npz", "0 samples"]),
    ("data-object-array", data(lambda p: np.savez(p, features=np.array([[1.0], [2.0, 3.0]], dtype=object))), 1, ["tiny.npz", "pickle"]),
    ("data-tensor-missing", data(lambda p: np.savez(p, feature=GOOD_DATA)), 1, ["tiny.npz", "input 'features' is missing"]),
    ("data-wrong-axis", data(lambda p: np.savez(p, features=GOOD_DATA[:, :5])), 1, ["tiny.npz", "input 'features': axis 1 is 5, expected 6"]),
    ("data-wrong-rank", data(lambda p: np.savez(p, features=GOOD_DATA[:, :, None])), 1, ["tiny.npz", "input 'features'", "rank 3"]),
    ("data-wrong-dtype", data(lambda p: np.savez(p, features=np.full((40, 6), "x"))), 1, ["tiny.npz", "input 'features': dtype <U1 cannot be used as float32"]),
    # a source model that cannot be compared with
    ("source-outputs-nan", factory(NAN_NET), 1, ["the source model's output 'scores' has", "NaN/Inf", "tiny.npz"]),
    ("source-not-a-module", factory(NOT_A_MODULE), 1, ["tinynet:build returned int, not a torch.nn.Module"]),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ws = tiny_workspace(tmp_path_factory.mktemp("bad") / "ws", 'kind = "torch"\nfactory = "tinynet:build"')
    np.savez(ws.root / "manifests/data/tiny.npz", features=GOOD_DATA)
    ws.doit("build")
    return ws


def _snapshot(root: Path) -> dict[str, str]:
    """Every published artifact, the lockfile and the source files: path -> sha256."""
    files = [*(root / "build/tiny").glob("*/*"), root / "build/tiny/kiln.lock.json", *(root / "manifests").rglob("*"), root / "tinynet.py"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files) if p.is_file()}


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case,change,code,texts", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_on_one_line_and_loses_nothing(built, case, change, code, texts):
    originals = {p: p.read_bytes() for p in [*(built.root / "manifests").rglob("*"), built.root / "tinynet.py"] if p.is_file()}
    artifacts = {k: v for k, v in _snapshot(built.root).items() if k.startswith("build/")}
    try:
        change(built)
        proc = built.doit("build", check=False)
        assert proc.returncode == code, (proc.returncode, proc.stdout[-800:], proc.stderr[-800:])
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if all(t in line for t in texts)]
        assert lines, f"no line holds {texts}:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
        assert "Traceback" not in proc.stdout + proc.stderr
        if code == 1:  # a step failed: its line names the step's log, which holds the traceback
            assert "(log: build/.kiln/logs/" in lines[0] and (built.root / lines[0].rsplit("(log: ", 1)[1].rstrip(")")).is_file()
        assert {k: v for k, v in _snapshot(built.root).items() if k.startswith("build/")} == artifacts
    finally:
        for path in [*(built.root / "manifests").rglob("*"), built.root / "tinynet.py"]:
            if path.is_file() and path not in originals:
                path.unlink()
        for path, content in originals.items():
            path.write_bytes(content)
