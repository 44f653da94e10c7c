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
import os
from pathlib import Path

from core.artifact import ArtifactError, current_version_dir, load_manifest
from server.errors import DeviceUnavailable, NotReady
from server.model import ModelVersion, load_version

log = logging.getLogger(__name__)
# From this many items on, the model rather than the event loop caps Recommend on few cores.
# 2 cores, 64 factors, one worker, the bench's load: one thread against two served 1,150 and
# 1,011 against 976 and 896 calls/s at 100k items, about the same at 200k (780, 765 against
# 794, 809), 586 and 526 against 720 and 670 at 300k, and 171 against 296 at 1M.
LARGE_CATALOG = 250_000


def ort_threads_for(cores: int, workers: int, n_items: int) -> int:
    """Intra-op threads per model run of a version: each worker's share of the cores, less one
    that its event loop needs to decode and answer calls, unless the catalog is so large that
    the model is the limit (LARGE_CATALOG)."""
    share = max(1, cores // workers)
    return share if n_items >= LARGE_CATALOG else max(1, share - 1)


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
    def __init__(
        self,
        model_dir: Path,
        device: str,
        threads: int = 0,
        workers: int = 1,
        facts: bool = False,
    ) -> None:
        self.model_dir = model_dir
        self.device = device
        self.threads = threads  # ONNX Runtime intra-op threads; 0: ort_threads_for each version
        self.workers = workers  # processes sharing the machine's cores
        self.facts = facts  # load each version's shop facts too (a server that offers)
        self.current: ModelVersion | None = None
        self.last_error: str | None = None
        # Reloads that failed, counted as they are logged (discountd_model_load_failures_total):
        # the old version keeps serving and health stays SERVING, so only this and the log
        # show that a promoted version did not go live.
        self.failures = 0
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
            except (ArtifactError, OSError, ValueError) as e:  # also an unreadable CURRENT
                self._fail(str(e), force)
                return False
            unchanged = self.current is not None and self.current.path == target
            # force (SIGHUP) retries a refused version; the serving one is sealed, so loading
            # it again would only cost a load and, meanwhile, twice its memory.
            if unchanged or (not force and target == self._refused):
                if unchanged and force:
                    log.info("model %s is serving already: nothing to load", target.name)
                return False
            try:
                model, threads = await asyncio.to_thread(self._load, target)
            except (ArtifactError, DeviceUnavailable) as e:
                self._refused = target
                self._fail(f"refused {target.name}: {e}", force)
                return False
            except Exception as e:
                # Sealed files with content the loader did not expect (items.json without a
                # category list, say), or a bug of the loader's. Refused like any broken version:
                # an escaping error would end the poller for good, hang the first load, and break
                # the SIGTERM drain. The traceback tells which of the two it was.
                log.exception("loading %s failed", target.name)
                self._refused = target
                self._fail(f"refused {target.name}: malformed version ({e!r})", force)
                return False
            previous, self.current = self.current, model
            self._refused, self.last_error = None, None
            freeze_long_lived()
            log.info(
                "serving model %s on %s, %d ONNX Runtime threads (%d items, %d users)%s",
                model.version,
                model.provider,
                threads,
                model.manifest.n_items,
                model.manifest.n_users,
                f", replacing {previous.version}" if previous else "",
            )
            return True

    def _load(self, target: Path) -> tuple[ModelVersion, int]:
        """The version at target and its ONNX Runtime threads (in a worker thread: it reads and
        hashes every file). The item count that sizes the threads comes from the manifest
        unverified; load_version verifies it before anything is served."""
        threads = self.threads or ort_threads_for(
            os.cpu_count() or 1, self.workers, load_manifest(target, verify=False).n_items
        )
        return load_version(target, self.device, threads, self.facts), threads

    def _fail(self, message: str, asked: bool) -> None:
        # The poller repeats a failure every few seconds: logged once. A reload someone asked
        # for (SIGHUP) is answered every time, or a retry that fails the same way looks ignored.
        if asked or message != self.last_error:
            # Before any version serves, start-up ends with this reason (`cannot serve: ...`).
            if self.current is not None:
                log.error("%s; still serving %s", message, self.current.version)
            self.failures += 1
        self.last_error = message
