"""Micro-batching: requests that arrive together share one forward pass.

Each request puts its preprocessed tensor on a queue; one worker takes what is waiting (up to ``max_batch``,
waiting at most ``max_wait_ms`` after the first), runs the model once in a thread and hands each request its
row. With max_batch 1 every request runs alone (the baseline the load benchmark compares against).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class _Item:
    x: torch.Tensor
    fut: asyncio.Future


class MicroBatcher:
    def __init__(self, infer: Callable[[torch.Tensor], np.ndarray], max_batch: int = 16,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int], Any] | None = None) -> None:
        self.infer, self.max_batch, self.max_wait = infer, max(1, int(max_batch)), max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None

    def _ensure(self) -> asyncio.Queue[_Item]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._worker())
        return self._queue

    async def submit(self, x: torch.Tensor) -> np.ndarray:
        """The model's output row for one input (C, ...)."""
        fut = asyncio.get_running_loop().create_future()
        await self._ensure().put(_Item(x, fut))
        return await fut

    async def _worker(self) -> None:
        q = self._queue
        assert q is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await q.get()]
            deadline = loop.time() + self.max_wait
            # Poll rather than wait_for(q.get()): a get cancelled by its timeout can swallow an item
            # (Python < 3.12), and that request would then never get its row.
            while len(items) < self.max_batch:
                if not q.empty():
                    items.append(q.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.sleep(min(left, 0.001))
            items = [it for it in items if not it.fut.cancelled()]  # timed-out requests need no row
            if not items:
                continue
            try:
                out = await asyncio.to_thread(self.infer, torch.stack([it.x for it in items]))
                if self.on_batch is not None:
                    self.on_batch(len(items))
                for it, row in zip(items, out):
                    if not it.fut.done():
                        it.fut.set_result(row)
            except Exception as e:  # one bad batch fails its requests, not the worker
                for it in items:
                    if not it.fut.done():
                        it.fut.set_exception(e)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task, self._queue = None, None
