"""The register component (see README.md)."""
