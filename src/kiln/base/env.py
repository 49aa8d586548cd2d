"""Switches read from the environment."""

from __future__ import annotations

import os


def switched_off(variable: str) -> bool:
    """Whether an on-by-default feature is turned off in the environment (KILN_CACHE=off, KILN_FRESH=0...)."""
    return os.environ.get(variable, "").lower() in ("off", "0", "false", "no")
