"""Whole sampler steps replayed as CUDA graphs (bf16 autocast lives in fastdd.models.precision).

`StepGraphs` records each sampler step once as a CUDA graph (static input buffers, one shared memory pool) and
replays it for every later batch with the same key; on CPU, or when capture fails, it runs the step eagerly
and says so once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

_said: set[str] = set()


def say_once(message: str) -> None:
    """A RuntimeWarning shown once per process for each distinct message."""
    if message not in _said:
        _said.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class CudaGraphRecorder:
    """How `StepGraphs` warms up, records and replays on CUDA (torch.cuda.graph, one shared memory pool)."""

    def __init__(self):
        self._pool = None

    def supports(self, inputs) -> bool:
        return all(t is None or t.is_cuda for t in inputs)

    def warm_up(self, fn: Callable[..., Tensor], inputs) -> Tensor:
        """fn(*inputs) on a side stream, as capture wants its first run."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def record(self, fn: Callable[..., Tensor], static_inputs) -> tuple[Callable[[], None], Tensor]:
        """Records fn(*static_inputs) -> (replay, static output)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = fn(*static_inputs)
        self._pool = graph.pool()
        return graph.replay, static_output


class StepGraphs:
    """Whole sampler steps as CUDA graphs, keyed by what fixes a step's recorded work (step index, shapes,
    the classes of the batch, ...).

    `run(key, fn, *inputs)`: inputs are tensors (or None) and fn(*inputs) returns one tensor. The first call
    with a key runs fn eagerly on a side stream (warm-up: lazy initialisation, torch.compile, caches filled);
    the second records fn on static copies of the inputs; every call from then on copies the inputs in and
    replays. Graphs share one memory pool, so they must be replayed in the order they were recorded, which a
    sampling loop does. fn must not sync with the host and must read any state that changes between calls
    from its inputs or from device tensors updated in place (see `Guidance.capturable`). On tensors the
    recorder does not support (CPU), or once a capture fails, every step runs eagerly (said once).
    """

    def __init__(self, recorder: CudaGraphRecorder | None = None):
        self.recorder = CudaGraphRecorder() if recorder is None else recorder
        self.enabled = True
        self._graphs: dict[Hashable, tuple[Callable[[], None], list, Tensor]] = {}
        self._warm: set[Hashable] = set()

    def run(self, key: Hashable, fn: Callable[..., Tensor], *inputs: Tensor | None) -> Tensor:
        if self.enabled and not self.recorder.supports(inputs):
            self.enabled = False
            say_once("cuda_graphs: CUDA graphs need CUDA tensors; running the sampler steps eagerly")
        if not self.enabled:
            return fn(*inputs)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._warm:
                self._warm.add(key)
                return self.recorder.warm_up(fn, inputs)
            static_inputs = [None if t is None else t.clone() for t in inputs]
            try:
                replay, static_output = self.recorder.record(fn, static_inputs)
            except Exception as error:  # capture refused (host sync, unsupported op): eager from now on
                self.enabled = False
                say_once(
                    f"cuda_graphs: capture failed ({type(error).__name__}: {error}); running the sampler steps eagerly"
                )
                return fn(*inputs)
            entry = self._graphs[key] = (replay, static_inputs, static_output)
        replay, static_inputs, static_output = entry
        for static, value in zip(static_inputs, inputs):
            if static is not None:
                static.copy_(value)
        replay()
        return static_output.clone()
