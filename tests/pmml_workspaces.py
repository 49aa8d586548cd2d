"""What the PMML tests share: Java (installed with apt-get where it is missing and that is possible),
and manifests/sklearn_iris.toml with a pmml target."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO

from kiln.formats.pmml import INSTALL_JAVA  # the one command kiln's own errors name
PMML_TARGET = '''[targets.pmml]
format = "pmml"                                # sklearn2pmml, scored in JPMML (needs Java)
thresholds = { max_abs_diff = 1e-6 }           # the same labels, probabilities within float rounding

'''


def iris_manifest(pmml_only: bool = False) -> str:
    """The iris example with a pmml target (only the pmml target: a faster build)."""
    text = (REPO / "manifests/sklearn_iris.toml").read_text()
    if "[targets.pmml]" not in text:
        text = text.replace("[validation]", PMML_TARGET + "[validation]", 1)
    if pmml_only:
        start, end = text.index("[targets.onnx]"), text.index("[targets.pmml]")
        text = text[:start] + text[end:]
    return text


def require_java() -> None:
    """Java on PATH: sklearn2pmml converts and JPMML scores in a JVM. Installed as CI does where it
    is missing (as root, with apt-get); the test is skipped, saying why, where that is impossible."""
    if shutil.which("java"):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"PMML needs Java and this machine has none; install it with: {INSTALL_JAVA} (needs root and apt-get)")
    for command in (["apt-get", "update"], INSTALL_JAVA.split()):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            pytest.skip(f"PMML needs Java; `{' '.join(command)}` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    if shutil.which("java") is None:
        pytest.skip(f"PMML needs Java; `{INSTALL_JAVA}` ran but `java` is still not on PATH")


def with_pmml_target(text: str, gate: str) -> str:
    """A manifest whose targets are replaced by one pmml target gated by `gate` (a TOML inline table's body)."""
    start, end = text.index("[targets."), text.index("[validation]")
    return text[:start] + f'[targets.pmml]\nformat = "pmml"\nthresholds = {{ {gate} }}\n\n' + text[end:]


def without_pmml(text: str) -> str:
    """An example manifest without its pmml target: for tests about its other targets (no Java)."""
    start = text.index("[targets.pmml]")
    return text[:start] + text[text.index("[validation]", start):]
