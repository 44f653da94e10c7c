"""Dynamic micro-batching for Recommend: concurrent calls share one graph run.

Reading the item factors dominates a single-user run on a large catalog, and one batched run
reads them once for every user in it. One run at a time: a batch starts as soon as the previous
run is done, and while it runs calls queue and the next batch takes them together, so batches
grow with load on their own. Two runs at a time on 2 cores cut the batches to a third (3.4
calls against ~11) and cost Recommend about 30% of its throughput at 100k items
(docs/BENCHMARKS.md). max_wait_us adds a deliberate pause to gather more (0: none).
"""

from __future__ import annotations

import asyncio
import contextlib

from server.metrics import Metrics
from server.model import ModelVersion
from server.recommend import Plan, Recommendation, finish, run_plans

Pending = tuple[ModelVersion, Plan, "asyncio.Future[Recommendation]"]


class Batcher:
    def __init__(self, max_batch: int, max_wait_us: int, metrics: Metrics) -> None:
        self.max_batch = max_batch
        self.max_wait = max_wait_us / 1e6
        self._model_free = asyncio.Lock()  # held from a batch's start to the end of its run
        self._metrics = metrics
        self._pending: list[Pending] = []
        self._arrived = asyncio.Event()
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def recommend(self, model: ModelVersion, plan: Plan) -> Recommendation:
        future: asyncio.Future[Recommendation] = asyncio.get_running_loop().create_future()
        self._pending.append((model, plan, future))
        self._arrived.set()
        if self._collector is None or self._collector.done():
            self._collector = asyncio.create_task(self._collect())
        return await future

    async def _collect(self) -> None:
        while self._pending:
            await self._model_free.acquire()
            if self.max_wait > 0 and len(self._pending) < self.max_batch:
                await self._gather_more()
            batch = self._take()
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _gather_more(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(self._pending) < self.max_batch:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def _take(self) -> list[Pending]:
        """Up to max_batch pending calls of the first call's model version, in arrival order."""
        model = self._pending[0][0]
        batch: list[Pending] = []
        rest: list[Pending] = []
        for entry in self._pending:
            if entry[0] is model and len(batch) < self.max_batch:
                batch.append(entry)
            else:
                rest.append(entry)
        self._pending = rest
        return batch

    async def _run(self, batch: list[Pending]) -> None:
        model = batch[0][0]
        plans = [plan for _, plan, _ in batch]
        try:
            # ONNX Runtime releases the GIL; a worker thread keeps the event loop answering.
            items, scores = await asyncio.to_thread(run_plans, model, plans)
            self._metrics.batch_size.observe(len(batch))
            for row, (_, plan, future) in enumerate(batch):
                if not future.done():  # the caller may have gone (cancelled)
                    future.set_result(finish(model, plan, items[row], scores[row]))
        except Exception as e:  # every caller of the batch sees the failure, not just one
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(e)
        finally:
            self._model_free.release()
