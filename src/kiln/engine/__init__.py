"""The doit glue. dodo.py imports doit_globals from here."""

from kiln.engine.tasks import doit_globals

__all__ = ["doit_globals"]
