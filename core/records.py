"""``record``: the value classes GetOffers builds per item, immutable where it is checked.

A frozen dataclass assigns each field through ``object.__setattr__``: 0.8 µs for six fields
against 0.2 µs for a plain slotted one, and a GetOffers answer builds five records per item
(an ItemInput, a Candidate, a PricedItem, an ItemDecision and an IssuedOffer), a tenth of its
Python time (docs/BENCHMARKS.md). A record is a slotted dataclass at run time that the type
checker treats as frozen, so assigning to a field fails `make lint` instead of every call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    return dataclass(slots=True)(cls)
