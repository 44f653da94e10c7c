"""The model store a server reads: which version serves now, and switching to a new one.

A new version is loaded and verified completely (server.model.load_version) off the event loop,
then swapped in with one assignment; requests hold a reference to the version they started with,
so a switch never changes a model under a running call. A refused version is remembered and not
retried until CURRENT names another version or a forced reload (SIGHUP) asks again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

from core.artifact import ArtifactError, current_version_dir
from server.errors import DeviceUnavailable, NotReady
from server.model import ModelVersion, load_version

log = logging.getLogger(__name__)


def freeze_long_lived() -> None:
    """Move every object alive now out of the garbage collector's sight (gc.freeze).

    Call it once data that lives as long as a model version (id maps, catalog facts) has been
    built: a full collection walks every tracked object, and with a 100k-item version loaded
    those walks paused the event loop for 70–100 ms every few seconds under GetOffers load,
    which was its p99 (docs/BENCHMARKS.md). Frozen objects are still freed by reference
    counting when a replaced version goes."""
    gc.collect()
    gc.freeze()


class ModelStore:
    def __init__(self, model_dir: Path, device: str, threads: int = 0, facts: bool = False) -> None:
        self.model_dir = model_dir
        self.device = device
        self.threads = threads  # ONNX Runtime intra-op threads; 0: one per core
        self.facts = facts  # load each version's shop facts too (a server that offers)
        self.current: ModelVersion | None = None
        self.last_error: str | None = None
        self._refused: Path | None = None
        self._lock = asyncio.Lock()

    def require(self) -> ModelVersion:
        model = self.current
        if model is None:
            raise NotReady(
                f"no model loaded yet from {self.model_dir}"
                + (f" ({self.last_error})" if self.last_error else "")
                + "; retry once health reports SERVING"
            )
        return model

    async def reload(self, force: bool = False) -> bool:
        """Switch to the version CURRENT names if it is new and sound; True when switched."""
        async with self._lock:
            try:
                target = current_version_dir(self.model_dir)
            except ArtifactError as e:
                self._fail(str(e))
                return False
            unchanged = self.current is not None and self.current.path == target
            if not force and (unchanged or target == self._refused):
                return False
            try:
                model = await asyncio.to_thread(
                    load_version, target, self.device, self.threads, self.facts
                )
            except (ArtifactError, DeviceUnavailable) as e:
                self._refused = target
                self._fail(f"refused {target.name}: {e}")
                return False
            previous, self.current = self.current, model
            self._refused, self.last_error = None, None
            freeze_long_lived()
            log.info(
                "serving model %s on %s (%d items, %d users)%s",
                model.version,
                model.provider,
                model.manifest.n_items,
                model.manifest.n_users,
                f", replacing {previous.version}" if previous else "",
            )
            return True

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            serving = self.current.version if self.current else "nothing"
            log.error("%s; still serving %s", message, serving)
        self.last_error = message
