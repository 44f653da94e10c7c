"""The discount-train command: a serving install (without the `train` extra) gets a message
saying what to install, not an ImportError's traceback."""

from __future__ import annotations

# Top-level packages of the `train` extra (pyproject.toml) that the trainer imports.
TRAIN_EXTRA = frozenset({"torch", "onnx", "onnxscript", "pandas", "pyarrow", "scipy", "matplotlib"})


def main() -> None:
    try:
        from trainer.cli import main as cli
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        raise SystemExit(
            f"discount-train needs the training extra ({e.name} is not installed): "
            "pip install 'discountd[train]'"
        ) from None
    cli()
