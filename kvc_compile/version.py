"""The package version (one place; the engine manifest records it)."""

__version__ = "0.1.0"
