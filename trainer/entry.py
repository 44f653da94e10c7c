"""The discount-train command: a serving install (without the `train` extra) gets a message
saying what to install, not an ImportError's traceback."""

from __future__ import annotations

from importlib.util import find_spec

from trainer.cli import main as cli

# This project's own packages: a missing one is a broken install, not a missing extra.
OWN_PACKAGES = frozenset({"trainer", "core", "server", "admin", "bench", "discount"})
# The `train` extra's packages (pyproject.toml), by import name. The commands import them only
# when they run, so they are looked up here, not imported: --help stays quick, and a serving
# install is told what to install before any command starts.
TRAIN_EXTRA = ("torch", "onnx", "onnxscript", "pandas", "pyarrow", "scipy", "matplotlib")


def main() -> None:
    missing = next((name for name in TRAIN_EXTRA if find_spec(name) is None), None)
    if missing is not None:
        raise SystemExit(_needs_extra(missing))
    try:
        cli()
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OWN_PACKAGES:
            raise
        raise SystemExit(_needs_extra(e.name)) from None
    except MemoryError:
        raise SystemExit(_TOO_BIG) from None
    except RuntimeError as e:  # torch: "DefaultCPUAllocator: can't allocate memory: ..."
        if "can't allocate memory" not in str(e):
            raise
        raise SystemExit(_TOO_BIG) from None


def _needs_extra(module: str | None) -> str:
    return (
        f"discount-train needs the training extra ({module} is not installed): "
        "pip install 'discountd[train]'"
    )


_TOO_BIG = (
    "discount-train: not enough memory for the sizes asked for; try fewer users, items, "
    "factors or hidden units"
)
