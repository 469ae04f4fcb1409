"""What every dataset loader shares: the error type."""
from __future__ import annotations

from storage.stage import StageError


class DatasetError(StageError):
    """A dataset file that cannot be read as its format; the message names the file and the line or field."""
