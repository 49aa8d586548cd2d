"""kiln: a declarative, incremental, validating build system for ML model artifacts."""

__version__ = "0.1.0"


def switched_off(variable: str) -> bool:
    """Whether an on-by-default feature is turned off in the environment (KILN_CACHE=off, KILN_FRESH=0...)."""
    import os

    return os.environ.get(variable, "").lower() in ("off", "0", "false", "no")
