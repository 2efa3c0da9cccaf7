"""The one family of exceptions medsr raises for problems with the user's input.

The CLI turns every :class:`MedsrError` into a single ``error: ...`` line and exit code 1.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class MedsrError(Exception):
    """A problem with the user's input, files or settings; the message says what and where.

    The message is folded onto one line (library texts quoted inside may span several), so the
    CLI can always print exactly one ``error: ...`` line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ScanReadError(MedsrError):
    """A scan could not be read: missing, corrupt, unsupported or inconsistent."""


class ConfigError(MedsrError):
    """A config file or override is invalid."""


class CheckpointError(MedsrError):
    """A weights file is missing, untrusted, corrupt or does not fit the model."""


class OutputError(MedsrError):
    """An output path cannot be written safely."""


class ExportError(MedsrError):
    """A model could not be exported, or the exported file does not reproduce the PyTorch model."""
