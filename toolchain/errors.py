"""User-facing error types.

Every error the CLI can explain in one line derives from ToolchainError; the CLI prints
``error: <message>`` and exits with status 2 instead of a traceback.
"""


class ToolchainError(Exception):
    """An error whose message is a complete, actionable sentence for the user."""


class InputError(ToolchainError):
    """A user-supplied file (image, data folder) cannot be used."""


class CheckpointError(ToolchainError):
    """A model or quantized checkpoint is missing, corrupt, untrusted or mismatched."""


class ConfigError(ToolchainError):
    """A configuration object, recipe or table is invalid."""


class MissingWeightsError(ToolchainError):
    """Pretrained weights a feature needs are not available locally (nothing is downloaded)."""


class ExportError(ToolchainError):
    """A model cannot be exported to the requested target."""


class InfeasibleBudgetError(ToolchainError):
    """A bit-width budget that no allocation can meet."""


class UsageError(ToolchainError):
    """A command line that cannot be parsed or an option value out of its range."""


class OutputError(ToolchainError):
    """An ``--out`` path that cannot be written without destroying something the tool did not write."""
