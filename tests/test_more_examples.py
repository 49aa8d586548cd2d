"""The example manifests of models kiln's authors did not shape around kiln: a causal language model
head with a GPT-2 style tokenizer (manifests/tiny_gpt2.toml), a vision transformer classifier
(tiny_vit.toml) and a stateful audio-like ONNX model whose state has its batch on axis 1 and whose
sample rate is a scalar (tiny_stateful.toml). Each builds with `doit build` in a fresh workspace and
every target validates on every sample; the committed example models and arrays are exactly what
manifests/models/make_example_models.py and manifests/data/make_example_data.py write."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, Workspace, example_workspace

TARGETS = {
    "tiny_gpt2": {"onnx_fp32", "onnx_fp16", "onnx_int8", "safetensors_fp16"},
    "tiny_vit": {"onnx_fp32", "onnx_fp16", "onnx_int8", "openvino_fp32", "safetensors_fp32", "torchscript"},
    "tiny_stateful": {"onnx_fp16", "onnx_int8", "openvino_fp32"},
}
SAMPLES = 16  # in tiny_vit.npz and tiny_stateful.npz
VOCAB = 512  # tiny-gpt2's


def build(root: Path, name: str) -> Workspace:
    ws = example_workspace(root / "ws", name)
    ws.doit("build", f"manifest={name}")
    return ws


@pytest.fixture(scope="module")
def built_stateful(tmp_path_factory) -> Workspace:
    return build(tmp_path_factory.mktemp("tiny_stateful"), "tiny_stateful")


@pytest.fixture(scope="module")
def built_vit(tmp_path_factory) -> Workspace:
    return build(tmp_path_factory.mktemp("tiny_vit"), "tiny_vit")


@pytest.fixture(scope="module")
def built_gpt2(tmp_path_factory) -> Workspace:
    return build(tmp_path_factory.mktemp("tiny_gpt2"), "tiny_gpt2")


def validated_rows(ws: Workspace, name: str) -> dict[str, dict[str, int]]:
    """target -> output -> rows compared, after checking the build passed and published every target."""
    report = ws.report(name)
    assert report["ok"], report
    assert {a["target"] for a in report["artifacts"]} == TARGETS[name]
    for artifact in report["artifacts"]:
        assert artifact["passed"] is True and (ws.root / artifact["path"]).is_file(), artifact
    return {a["target"]: {output: m["rows"] for output, m in a["metrics"].items()} for a in report["artifacts"]}


def reference_file(ws: Workspace, name: str) -> dict[str, np.ndarray]:
    """The reference_outputs step's tensors ("<batch>/in|out/<name>")."""
    from safetensors.numpy import load_file

    (step,) = [s for s in ws.report(name)["steps"] if s["rule"] == "reference_outputs"]
    return load_file(ws.root / step["outputs"][0]["path"])


def joined(tensors: dict[str, np.ndarray], key: str, axis: int) -> np.ndarray:
    """One output of every batch, concatenated along its batch axis."""
    return np.concatenate([tensors[k] for k in sorted(tensors) if k.endswith(key)], axis=axis)


def integer_ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type.endswith("Integer") or n.op_type.startswith("QLinear")]


def gate_failures(name: str, target: str, reference: np.ndarray, output: np.ndarray, padding: np.ndarray | None = None) -> list[str]:
    """What the target's own gates (its thresholds over the int8 defaults) say about `output`."""
    from kiln.runtime.metrics import OutputMetrics, failures
    from kiln.schema.fields import PRECISION_DEFAULTS

    table = tomllib.loads((REPO / "manifests" / f"{name}.toml").read_text())["targets"][target]
    thresholds = PRECISION_DEFAULTS[table.get("precision", "fp32")].model_dump() | table.get("thresholds", {})
    metrics = OutputMetrics()
    metrics.add(reference, output, padding)
    return failures({"out": metrics.summary()}, thresholds)


# ---- tiny_stateful: batch on axis 1 of the state, a scalar input --------------------------------

def stateful_source_run(arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(REPO / "manifests/models/tiny_stateful.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["features", "new_state"], arrays)


def test_stateful_builds_and_compares_every_sample(built_stateful):
    rows = validated_rows(built_stateful, "tiny_stateful")
    # features [batch, 8]: one row per sample; new_state [2, batch, 16]: one per sample and layer
    assert rows == {target: {"features": SAMPLES, "new_state": 2 * SAMPLES} for target in TARGETS["tiny_stateful"]}
    assert integer_ops(built_stateful.root / "build/tiny_stateful/onnx_int8/model.onnx"), "the int8 target quantized nothing"


def test_stateful_reference_is_the_model_run_on_all_samples_at_once(built_stateful):
    """The state cut on its axis 1 and the scalar fed whole: batches of 8 give exactly the outputs of
    one run over all 16 samples. Cutting the state on axis 0, or pairing samples with other
    samples' states, would give other features, which reference and artifacts would then share."""
    data = dict(np.load(REPO / "manifests/data/tiny_stateful.npz"))
    features, new_state = stateful_source_run(data)
    tensors = reference_file(built_stateful, "tiny_stateful")
    assert sorted(k for k in tensors if k.endswith("/in/sample_rate")) == ["00000/in/sample_rate", "00001/in/sample_rate"]
    assert all(tensors[k].shape == () for k in tensors if k.endswith("/in/sample_rate"))
    np.testing.assert_allclose(joined(tensors, "/out/features", 0), features, atol=1e-6)
    np.testing.assert_allclose(joined(tensors, "/out/new_state", 1), new_state, atol=1e-6)


def test_stateful_gates_fail_a_model_given_the_wrong_state_or_rate():
    """The example can catch mistakes: outputs computed from another sample's state, from a zero
    state or at another sample rate all fail the loosest target's gates (onnx_int8)."""
    data = dict(np.load(REPO / "manifests/data/tiny_stateful.npz"))
    features, new_state = stateful_source_run(data)
    wrong = {
        "neighbour's state": data | {"state": np.roll(data["state"], 1, axis=1)},
        "zero state": data | {"state": np.zeros_like(data["state"])},
        "8 kHz": data | {"sample_rate": np.array(8000, dtype=np.int64)},
    }
    for what, arrays in wrong.items():
        bad_features, bad_state = stateful_source_run(arrays)
        assert gate_failures("tiny_stateful", "onnx_int8", features, bad_features), what
    assert gate_failures("tiny_stateful", "onnx_int8", new_state, stateful_source_run(wrong["neighbour's state"])[1])


# ---- tiny_vit: an image-classification head fed pixel_values from .npz --------------------------

@pytest.mark.slow
def test_vit_builds_every_cpu_format_validated(built_vit):
    rows = validated_rows(built_vit, "tiny_vit")
    assert rows == {target: {"logits": SAMPLES} for target in TARGETS["tiny_vit"]}
    assert integer_ops(built_vit.root / "build/tiny_vit/onnx_int8/model.onnx")
    logits = joined(reference_file(built_vit, "tiny_vit"), "/out/logits", 0)
    assert logits.shape == (SAMPLES, 5)
    # an artifact that ignored its image and gave every one the mean logits fails the int8 gates
    assert gate_failures("tiny_vit", "onnx_int8", logits, np.broadcast_to(logits.mean(axis=0), logits.shape))


# ---- tiny_gpt2: a causal-LM head, a tokenizer without a pad token -------------------------------

def real_tokens() -> int:
    """Tokens of manifests/data/sentences.txt as the validation sees them (truncated at 128)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "manifests/models/tiny-gpt2")
    assert tokenizer.pad_token is None  # what this example is for: kiln pads with eos
    lines = [line.strip() for line in (REPO / "manifests/data/sentences.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(len(ids) for ids in tokenizer(lines, truncation=True, max_length=128)["input_ids"])


@pytest.mark.slow
def test_gpt2_builds_with_logits_over_the_vocabulary(built_gpt2):
    import onnx

    rows = validated_rows(built_gpt2, "tiny_gpt2")
    tokens = real_tokens()
    assert rows == {target: {"logits": tokens} for target in TARGETS["tiny_gpt2"]}  # padded positions left out
    (logits,) = onnx.load(str(built_gpt2.root / "build/tiny_gpt2/onnx_fp32/model.onnx")).graph.output
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", "sequence", VOCAB]
    assert integer_ops(built_gpt2.root / "build/tiny_gpt2/onnx_int8/model.onnx")
    tensors = reference_file(built_gpt2, "tiny_gpt2")
    first = tensors["00000/out/logits"]
    assert first.shape == (32, tensors["00000/in/input_ids"].shape[1], VOCAB)
    # the same scores at every position (a collapsed model) fail the int8 gates
    mask = tensors["00000/in/attention_mask"]
    collapsed = np.broadcast_to(first[mask != 0].mean(axis=0), first.shape)
    assert gate_failures("tiny_gpt2", "onnx_int8", first, collapsed, mask)


# ---- the committed models and arrays are reproducible -------------------------------------------

def files_under(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    found = {}
    for name in names:
        path = folder / name
        for file in sorted(path.rglob("*") if path.is_dir() else [path]):
            if file.is_file() and "__pycache__" not in file.parts:
                found[str(file.relative_to(folder))] = file.read_bytes()
    return found


def test_make_example_models_writes_the_committed_files(tmp_path):
    written_by = json.loads((REPO / "manifests/models/tiny-gpt2/config.json").read_text())["transformers_version"]
    import transformers

    if transformers.__version__ != written_by:  # config.json records the version; other versions write other bytes
        pytest.skip(f"the example models were written with transformers {written_by}, this is {transformers.__version__}")
    proc = subprocess.run([sys.executable, "manifests/models/make_example_models.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = ("tiny-gpt2", "tiny-vit", "tiny_stateful.onnx")
    committed, written = files_under(REPO / "manifests/models", names), files_under(tmp_path, names)
    assert sorted(written) == sorted(committed)
    assert [name for name in committed if committed[name] != written[name]] == []
    for name, data in committed.items():
        assert len(data) < 1 << 20, f"{name} is {len(data)} bytes; example files stay under 1 MB"


def test_make_example_data_writes_the_committed_arrays(tmp_path):
    proc = subprocess.run([sys.executable, "manifests/data/make_example_data.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("iris.npz", "tinycnn.npz", "tinycnn_calibration.npz", "tiny_vit.npz", "tiny_stateful.npz"):
        # the arrays, bit for bit: the zip around them varies with Python's zipfile (3.11.2 and 3.11.7
        # mark numpy's forced zip64 entries differently)
        with np.load(tmp_path / name) as written, np.load(REPO / "manifests/data" / name) as committed:
            assert written.files == committed.files, name
            for key in committed.files:
                assert written[key].dtype == committed[key].dtype and written[key].shape == committed[key].shape, f"{name}:{key}"
                assert written[key].tobytes() == committed[key].tobytes(), f"{name}:{key}"
    arrays = np.load(tmp_path / "tiny_stateful.npz")
    assert arrays["audio"].shape == (SAMPLES, 160) and arrays["state"].shape == (2, SAMPLES, 16)
    assert arrays["sample_rate"].shape == () and arrays["sample_rate"].dtype == np.int64
    assert np.load(tmp_path / "tiny_vit.npz")["pixel_values"].shape == (SAMPLES, 3, 32, 32)
