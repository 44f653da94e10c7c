"""Typed store errors; the CLI and the server map each to a message or a status code."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises on purpose; the message says how to fix it."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or opened."""


class SchemaOutOfDate(StoreError):
    """The database schema is not at the revision this build was written for."""


class NotFound(StoreError):
    """A named segment, rule, experiment or model version does not exist."""


class Conflict(StoreError):
    """A write lost a race or would break a uniqueness rule; nothing was changed."""


class DataRefused(StoreError):
    """The database refused a write's data itself (a value its columns cannot hold): a check
    upstream let it through, and retrying the same data cannot help."""


class InvalidInput(StoreError):
    """Input that the store refuses to write; nothing was changed."""
