"""kiln: a declarative, incremental, validating build system for ML model artifacts."""

__version__ = "0.1.0"
