"""The next step's groups, sampled while this step trains (``train.async_rollouts``).

Generation and the update are the two halves of a step, and each leaves the device idle at times: the host
launching, scoring, logging, synchronising. Side by side, each half runs in the other's idle time, and where the
device runs both halves' kernels at once, the step costs as little as the longer half (benchmarks/stream_overlap.py
tells whether a GPU does). The price is one step of staleness: the engine copies the weights before this step's
update and samples with that copy, so the batch the next step trains on comes from weights one update older; its
old log-probs, for the ratio, are the ones the engine recorded.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from rlreason.training.groups import GroupSampler, SampledBatch


class BatchPrefetcher:
    """At most one batch in flight, sampled on a worker thread by a snapshot of the weights.

    ``position`` is where the prompt stream stood before the batch in flight (or not yet trained) was drawn: a
    checkpoint records it, so that a resumed run draws that batch again instead of skipping it.
    """

    def __init__(self, sampler: GroupSampler, engine: Any, device: torch.device):
        self.sampler, self.engine = sampler, engine
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlreason-rollout")
        self._pending: Future[SampledBatch] | None = None
        self.position: int | None = None
        # a stream of its own, whose kernels go first when both halves wait for the device
        self._stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def start(self, P: int, G: int) -> None:
        """Snapshot the weights now (before the update that follows) and sample P groups of G from them."""
        if self._pending is not None:
            raise RuntimeError("a batch is already in flight")
        self.position = self.sampler.stream.position
        self.engine.snapshot()
        ready = None
        if self._stream is not None:  # the worker's kernels start after the snapshot's copies
            ready = torch.cuda.Event()
            ready.record()
        self._pending = self._pool.submit(self._sample, P, G, ready)

    def _sample(self, P: int, G: int, ready: torch.cuda.Event | None) -> SampledBatch:
        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                if ready is not None:
                    self._stream.wait_event(ready)
                return self.sampler.sample(P, G)
        finally:
            self.engine.unpin()

    def wait(self) -> None:
        """Until the batch in flight is sampled (it stays here for ``take``): the engine is free again."""
        if self._pending is not None:
            self._pending.exception()

    def take(self) -> SampledBatch:
        """The batch in flight, once sampled, marked ``stale`` (its sampling's errors raised here)."""
        if self._pending is None:
            raise RuntimeError("no batch in flight")
        pending, self._pending, self.position = self._pending, None, None
        return replace(pending.result(), stale=True)

    def close(self) -> None:
        """Wait for the worker and drop any batch not taken."""
        self.wait()
        self._pending = self.position = None
        self._pool.shutdown(wait=True)
