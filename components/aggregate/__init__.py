"""The aggregate component (see README.md)."""
