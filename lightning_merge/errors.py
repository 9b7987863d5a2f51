"""Errors a user can cause. The CLI prints any of these as one line and exits non-zero."""


class LightningMergeError(Exception):
    """Base class: a problem with the user's input, reported as one line naming the fix."""


class ArchitectureMismatch(LightningMergeError):
    """Two models (or a model and statistics) do not have the same architecture."""


class UnsupportedModel(LightningMergeError):
    """A model class the permutation spec does not know."""


class CheckpointError(LightningMergeError):
    """A checkpoint is missing, unreadable or corrupt."""


class DataError(LightningMergeError):
    """Input data is missing, empty, or of the wrong shape."""


class SourceError(LightningMergeError):
    """An offline source could not be fetched or failed its hash check."""


class UnknownNameError(LightningMergeError, KeyError):
    """A name (method, preset, task, variant) that no registry knows."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConfigError(LightningMergeError):
    """A configuration value is invalid."""


class OutputError(LightningMergeError):
    """An output cannot be written where it goes (no space left, no permission, read-only)."""


class OutputExistsError(LightningMergeError):
    """A run directory exists already and would be overwritten."""
