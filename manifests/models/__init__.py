"""Example models for the manifests in this folder (factories named `models.<module>:build`)."""
