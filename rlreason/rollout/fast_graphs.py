"""Runs the fast engine's decode steps: eagerly, or on CUDA as graphs recorded once per step shape and replayed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from rlreason.rollout.engine import SamplingParams
from rlreason.rollout.fast_weights import EngineWeights
from rlreason.rollout.fast_workspace import StepShape, Workspace

Step = Callable[[Workspace, EngineWeights, StepShape, SamplingParams], None]


class StepRunner:
    """Replays the workspace's graph for a step's shape and sampling, capturing it the first time.

    ``any_width``: the step reads the cache width from the device (the Triton step), so one graph serves every width.
    """

    def __init__(self, step: Step, cuda_graphs: bool, any_width: bool, device: torch.device):
        self.step, self.cuda_graphs, self.any_width = step, cuda_graphs, any_width
        self._side_stream = torch.cuda.Stream(device) if cuda_graphs else None  # where graphs are recorded
        self._warm: set[tuple] = set()  # steps already run eagerly once: libraries and Triton kernels ready

    def run(
        self, ws: Workspace, weights: EngineWeights, shape: StepShape, sampling: SamplingParams, stats: dict[str, Any]
    ) -> None:
        """One step; the seconds spent capturing graphs add up in ``stats["capture_s"]``."""
        if not self.cuda_graphs:
            self.step(ws, weights, shape, sampling)
            return
        if self.any_width:
            shape = replace(shape, width=0)
        key = (shape, sampling.greedy, sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_new_tokens)
        graph = ws.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        started = time.perf_counter()
        self._capture(key, ws, weights, shape, sampling)
        stats["capture_s"] = stats.get("capture_s", 0.0) + time.perf_counter() - started

    def _capture(
        self, key: tuple, ws: Workspace, weights: EngineWeights, shape: StepShape, sampling: SamplingParams
    ) -> None:
        """The first time, this step runs eagerly on the side stream (which warms up the libraries and compiles the
        Triton kernels) and is then recorded without running; at later calls (a new workspace: release_memory)
        it is only recorded, then replayed. Either way the state moves once."""
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream())
        warm = key in self._warm
        if not warm:
            with torch.cuda.stream(side):
                self.step(ws, weights, shape, sampling)
            self._warm.add(key)
        # capture_begin/end rather than torch.cuda.graph, which empties the allocator's cache first: that would
        # hand back the training pass's blocks at every generate call, and the next pass would allocate them again.
        # thread_local: a training pass on another thread (train.async_rollouts) may allocate meanwhile
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin(pool=ws.pool, capture_error_mode="thread_local")
            try:
                self.step(ws, weights, shape, sampling)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        ws.graphs[key] = graph
        if warm:
            graph.replay()
