"""The annotate component (see README.md)."""
