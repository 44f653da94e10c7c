"""Errors the domain code raises; server.service maps them to gRPC status codes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequest(Exception):
    """The request is malformed; nothing reached the model."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class NotReady(Exception):
    """No model version is loaded and warm yet."""


class DeviceUnavailable(Exception):
    """The requested execution device cannot be used."""


class StoreDown(Exception):
    """The store cannot take a write now; nothing was acknowledged. Maps to UNAVAILABLE."""


class StoreRefused(Exception):
    """The store refused a write's data itself: a check of ours let through what its columns
    cannot hold. Retrying cannot help, so not UNAVAILABLE: maps to INTERNAL, a bug."""


class Overloaded(Exception):
    """A bounded queue is full; nothing was done. Maps to RESOURCE_EXHAUSTED."""
