"""The package version, in one place (setup.cfg's ``version`` must say the same; a test checks it)."""

__version__ = "0.1.0"
