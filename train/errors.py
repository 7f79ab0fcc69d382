"""The training job's failures that are the user's to fix, each phrased for them.

``train.__main__`` writes the message of a :class:`JobError` to the failure file as it is; any
other exception is an internal error and is reported with its type.
"""

from __future__ import annotations


class JobError(Exception):
    """A failure whose message says what went wrong and what to do about it."""


class SettingsError(JobError, ValueError):
    """A setting is missing, unknown or has a value that cannot be used."""


class DataError(JobError):
    """The training data cannot be used as given."""


class PeerError(JobError):
    """The job's processes could not find or reach each other."""


class DivergedError(JobError):
    """Training produced numbers that are not finite (NaN or infinity)."""


class CheckpointError(JobError):
    """A checkpoint could not be written; no partial file of it is left in the folder."""


class CheckpointSyncError(JobError):
    """The checkpoints could not be read from or written to S3."""
