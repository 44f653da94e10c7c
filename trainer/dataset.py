"""In-memory form of a shop's history, shared by every trainer step.

Ids stay strings (leading zeros matter); positions in ``user_ids`` and ``Catalog.item_ids`` are
the integer indices the model and the ONNX graph use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Float32s = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Catalog:
    item_ids: list[str]
    categories: list[str]  # "" where the catalog has none
    titles: list[str]
    prices: Floats  # current unit price
    costs: Floats  # unit cost; assumed from a default margin where cost_assumed
    cost_assumed: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class Interactions:
    user_index: Ints
    item_index: Ints
    timestamp: Ints  # Unix seconds
    event: list[str]  # purchase | view | click | cart
    quantity: Ints
    price: Floats  # unit price paid; NaN where unknown


@dataclass(frozen=True)
class Dataset:
    user_ids: list[str]
    catalog: Catalog
    interactions: Interactions


@dataclass(frozen=True)
class Factors:
    """A trained factor model: score(u, i) = user[u] · item[i] + item_bias[i].

    ``foldin`` is (YᵀY + λI)⁻¹ for the item factors Y: the least-squares user vector of an unseen
    user who likes items H is ``foldin @ sum(item[h] for h in H)``.
    """

    user: Float32s
    item: Float32s
    item_bias: Float32s
    foldin: Float32s
