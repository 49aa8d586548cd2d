"""The repo's example model factories (manifests/models), importable from tests."""

from __future__ import annotations

import sys

from conftest import REPO


def iris_build():
    sys.path.insert(0, str(REPO / "manifests"))
    try:
        from models.iris import build

        return build()
    finally:
        sys.path.remove(str(REPO / "manifests"))
