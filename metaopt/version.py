"""The package version, in one place (``metaopt.__version__``; recorded in saved checkpoints)."""

__version__ = "0.1.0"
