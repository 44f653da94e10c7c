"""The discount-train command: a serving install (without the `train` extra) gets a message
saying what to install, not an ImportError's traceback."""

from __future__ import annotations

# This project's own packages: a missing one is a broken install, not a missing extra.
OWN_PACKAGES = frozenset({"trainer", "core", "server", "admin", "bench", "discount"})


def main() -> None:
    try:
        from trainer.cli import main as cli
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OWN_PACKAGES:
            raise
        raise SystemExit(
            f"discount-train needs the training extra ({e.name} is not installed): "
            "pip install 'discountd[train]'"
        ) from None
    try:
        cli()
    except MemoryError:
        raise SystemExit(_TOO_BIG) from None
    except RuntimeError as e:  # torch: "DefaultCPUAllocator: can't allocate memory: ..."
        if "can't allocate memory" not in str(e):
            raise
        raise SystemExit(_TOO_BIG) from None


_TOO_BIG = (
    "discount-train: not enough memory for the sizes asked for; try fewer users, items, "
    "factors or hidden units"
)
