"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class PosttrainError(Exception):
    """Base class: the message says what is wrong and where."""


class DataError(PosttrainError):
    """A bad data file or row. The message names the file, the row and the field."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None):
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field `{field}`")
        self.source, self.row, self.field = source, row, field
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class RewardError(PosttrainError):
    """A reward source failed or returned something unusable."""


class TrainingError(PosttrainError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""
