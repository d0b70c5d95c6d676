"""Errors the model layer raises for bad input or bad files.

Each carries a message meant for the person who sent the request, so serving code can pass it
through unchanged instead of showing a traceback.
"""


class OmniError(Exception):
    """Base class: something the user can fix (their audio, their paths, their settings)."""


class AudioError(OmniError):
    """The audio could not be used: empty, silent, corrupt, not audio, or too long."""


class AudioTooLongError(AudioError):
    """The audio is longer than the configured maximum."""


class CheckpointError(OmniError):
    """A model file is missing or does not match the expected layout."""


class ContextLengthError(OmniError):
    """A conversation no longer fits the model's context window."""
