"""Errors that reach users. The CLI prints them as one line and exits non-zero."""


class DiffmasError(Exception):
    """Base class: a user-facing problem with a clear message (bad input, missing data, ...)."""
