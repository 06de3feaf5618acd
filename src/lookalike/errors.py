"""Project exceptions: every error a user can cause is one of these.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; the message
must say what went wrong and what to do about it.
"""

from __future__ import annotations


class LookalikeError(Exception):
    """Base class of the errors a user can cause (bad input, bad config, wrong index)."""

    exit_code = 1


class ConfigError(LookalikeError, ValueError):
    """An unknown preset, model, pooling, factory string or option value (also a ValueError)."""

    exit_code = 2


class ImageError(LookalikeError):
    """An image file that cannot be read: missing, truncated, corrupt, too large."""

    exit_code = 3


class IndexStateError(LookalikeError):
    """An index directory that is missing, not an index, or built with other settings."""

    exit_code = 4


class IndexLockedError(LookalikeError):
    """Another process is writing to the index."""

    exit_code = 5


class StorageError(LookalikeError):
    """The disk is full, a directory is read-only or a permission is missing: nothing is
    wrong with the index, which stays valid; free space or fix the permission and rerun."""

    exit_code = 6
