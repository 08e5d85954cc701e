"""The one error type of the checkpoint tools: a checkpoint (or an output) is not what a conversion
needs. Messages name the offending file and say what was expected, so a user can tell a truncated
copy from a wrong path from an unsupported layout without reading a traceback."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent, or an output cannot be written."""
