"""The one exception type for bad input: the CLI prints its message on one line and exits non-zero."""

from __future__ import annotations

__all__ = ["SmoothAdvError"]


class SmoothAdvError(ValueError):
    """A user-facing error: bad argument, missing data, unreadable checkpoint or result file."""
