"""The package version, in one place (the package __init__ and the checkpoint writer read it)."""

__version__ = "0.1.0"
