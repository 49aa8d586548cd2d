"""format = "pmml" at check time: a machine without Java fails `kiln check` (and a build, before any
step) with the command that installs it; the feature fields follow the input; a label output must
be gated so that it is identical to the source's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, new_workspace
from kiln.define.spec import validate
from kiln.errors import ManifestError
from kiln.schema.manifest import RawManifest
from pmml_workspaces import iris_manifest, require_java


def no_java_env(tmp_path: Path) -> dict[str, str]:
    """PATH without java (kiln is run by its absolute interpreter path)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    return os.environ | {"PATH": str(empty), "HF_HUB_OFFLINE": "1"}


def test_without_java_check_and_build_fail_with_the_install_command(tmp_path: Path):
    ws = new_workspace(tmp_path / "ws", {"sklearn_iris": iris_manifest()})
    env = no_java_env(tmp_path)
    check = subprocess.run([sys.executable, "-m", "kiln.cli", "check", "sklearn_iris"], cwd=ws.root, capture_output=True, text=True, env=env)
    build = subprocess.run([sys.executable, "-m", "doit", "build", "manifest=manifests/sklearn_iris.toml"], cwd=ws.root, capture_output=True, text=True, env=env)
    for proc in (check, build):
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert "manifests/sklearn_iris.toml: targets.pmml.format: " in line and line.endswith("install it with: apt-get install -y openjdk-17-jre-headless")
    assert not (ws.root / "build").exists()  # nothing ran


def manifest(text: str) -> RawManifest:
    import tomllib

    return RawManifest(path=REPO / "manifests/pmml_test.toml", data=tomllib.loads(text), sha256="0" * 64)


def refused(text: str) -> str:
    with pytest.raises(ManifestError) as err:
        validate(manifest(text))
    return str(err.value)


@pytest.fixture
def java_found(monkeypatch):
    """The checks after the Java one, on any machine."""
    monkeypatch.setattr("kiln.formats.pmml.shutil.which", lambda name: f"/usr/bin/{name}")


def test_feature_names_name_every_column_once(java_found):
    text = iris_manifest().replace('format = "pmml"', 'format = "pmml"\noptions = { feature_names = ["a", "b", "c"] }')
    assert "expected 4 names, one per column of input 'features'" in refused(text)
    twice = text.replace('["a", "b", "c"]', '["a", "b", "c", "a"]')
    assert "names used once, and not the target field's name 'label'" in refused(twice)


def test_the_input_must_have_a_fixed_number_of_features(java_found):
    text = iris_manifest().replace('shape = ["batch", 4]', 'shape = ["batch", "features"]')
    assert "inputs.features.shape" in refused(text) and "N the model's feature count, a fixed int" in refused(text)


def test_feature_names_default_to_the_inputs_csv_columns(java_found):
    from kiln.formats.pmml import feature_names

    columns = '["sl", "sw", "pl", "pw"]'
    spec = validate(manifest(iris_manifest().replace('shape = ["batch", 4]', f'shape = ["batch", 4]\ncolumns = {columns}', 1)))
    assert feature_names(spec, "pmml", spec.targets["pmml"]) == ["sl", "sw", "pl", "pw"]
    spec = validate(manifest(iris_manifest()))
    assert feature_names(spec, "pmml", spec.targets["pmml"]) == ["features_0", "features_1", "features_2", "features_3"]


def test_a_lightgbm_booster_file_cannot_give_pmml_at_check_time(java_found):
    text = (REPO / "manifests/lightgbm_diabetes.toml").read_text().replace('factory = "models.diabetes:build"', 'path = "diabetes.txt"')
    assert "source.path: 'diabetes.txt' is not allowed; expected a factory (or an allowed pickle) giving an LGBMClassifier or LGBMRegressor for a pmml target" in refused(text)


def test_the_iris_example_gives_pmml(java_found):
    spec = validate(manifest(iris_manifest()))
    assert spec.targets["pmml"].format == "pmml" and spec.targets["pmml"].options.feature_names is None


def test_a_torch_source_cannot_give_pmml(java_found):
    text = (REPO / "manifests/tinycnn.toml").read_text()
    text += '\n[targets.pmml]\nformat = "pmml"\n'
    assert "targets.pmml.format: 'pmml'" in refused(text) and "pmml needs a" in refused(text)


def test_a_damaged_pmml_is_a_one_line_error_and_the_jvm_ends_with_the_runner(tmp_path: Path):
    pytest.importorskip("jpmml_evaluator")
    require_java()
    import gc

    from kiln.errors import StepError
    from kiln.formats.pmml import Pmml
    from kiln.runtime.runners import Artifact

    specs = [{"name": "label", "dtype": "int64", "shape": ["batch"]}]
    artifact = Artifact(tmp_path / "model.pmml", ["label"], "m/pmml/validate", inputs=[{"name": "x"}], output_specs=specs, options={"feature_names": ["a"]})
    artifact.path.write_text('<?xml version="1.0"?>\n<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4"><Header/>')  # cut short
    with pytest.raises(StepError) as err:
        Pmml().open_runner(artifact)
    assert str(err.value).startswith("m/pmml/validate: JPMML cannot load model.pmml: ") and "\n" not in str(err.value)
    artifact.path.write_text(PMML_ONE_FEATURE)
    run = Pmml().open_runner(artifact)
    import numpy as np

    assert run({"x": np.array([[-1.0], [2.0]], dtype=np.float32)})["label"].tolist() == [0, 1]
    assert len(java_children()) == 1
    del run
    gc.collect()
    deadline = time.monotonic() + 10
    while java_children() and time.monotonic() < deadline:  # the JVM exits once its gateway is shut down
        time.sleep(0.1)
    assert java_children() == []


def test_a_pmml_reading_a_field_validation_does_not_feed_is_refused_and_close_ends_the_jvm(tmp_path: Path):
    """JPMML would score the missing field as missing: plausible numbers from the wrong inputs."""
    pytest.importorskip("jpmml_evaluator")
    require_java()
    from kiln.errors import StepError
    from kiln.formats.pmml import Pmml
    from kiln.runtime.runners import Artifact, close_runner

    specs = [{"name": "label", "dtype": "int64", "shape": ["batch"]}]
    artifact = Artifact(tmp_path / "model.pmml", ["label"], "m/pmml/validate", inputs=[{"name": "x"}], output_specs=specs, options={"feature_names": ["b"]})
    artifact.path.write_text(PMML_ONE_FEATURE)
    with pytest.raises(StepError, match=r"^m/pmml/validate: model\.pmml reads input field 'a', which validation does not feed; it feeds \['b'\]"):
        Pmml().open_runner(artifact)
    run = Pmml().open_runner(Artifact(artifact.path, ["label"], "m/pmml/validate", inputs=[{"name": "x"}], output_specs=specs, options={"feature_names": ["a"]}))
    assert len(java_children()) == 1
    close_runner(run)  # while the runner is still referenced, as a failed gate's traceback keeps it
    assert java_children() == []
    close_runner(run)  # twice is harmless


def java_children() -> list[int]:
    """This process's child JVMs (the py4j gateways it launched), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:  # ended while listed
            continue
        if int(fields[1]) == os.getpid() and b"py4j" in command and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


# x > 0.5 -> class 1, else 0, as a PMML tree (what sklearn2pmml writes for a one-split tree, by hand)
PMML_ONE_FEATURE = '''<?xml version="1.0" encoding="UTF-8"?>
<PMML xmlns="http://www.dmg.org/PMML-4_4" version="4.4">
	<Header/>
	<DataDictionary>
		<DataField name="label" optype="categorical" dataType="integer"><Value value="0"/><Value value="1"/></DataField>
		<DataField name="a" optype="continuous" dataType="double"/>
	</DataDictionary>
	<TreeModel functionName="classification" splitCharacteristic="binarySplit">
		<MiningSchema><MiningField name="label" usageType="target"/><MiningField name="a"/></MiningSchema>
		<Node score="0"><True/>
			<Node score="1"><SimplePredicate field="a" operator="greaterThan" value="0.5"/></Node>
			<Node score="0"><True/></Node>
		</Node>
	</TreeModel>
</PMML>
'''
