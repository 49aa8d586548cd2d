"""`doit build [manifest=manifests/bert.toml]` from the repository root (see README)."""
from kiln.engine import doit_globals
globals().update(doit_globals())
