"""The training pairs of each step, drawn ahead in threads and the same with any number of them.

Pair ``i`` of step ``s`` of a run is drawn with a random generator of its own, seeded by the
run's seed, ``s`` and ``i`` (:func:`pair_generator`), so no pair depends on what was drawn
before it. That makes two things simple: a resumed run needs only its step to continue the
sequence, and :class:`PairStream` can draw the next steps' pairs in worker threads while the
current step trains (on a GPU the network is faster than one thread's synthesis) without
changing a single pair.

Example
-------
>>> from regpipe.training_data import RandomShapesSource
>>> stream = PairStream(RandomShapesSource(), (16, 16, 16), seed=0, batch_size=1, workers=2,
...                     last_step=2)
>>> [pair.moving.shape for pair in stream.pairs(1)]
[torch.Size([1, 1, 16, 16, 16])]
>>> stream.close()
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from regpipe.training_data import PairSource, TrainingPair

__all__ = ["PairStream", "default_workers", "pair_generator"]


def pair_generator(seed: int, step: int, item: int) -> torch.Generator:
    """The random generator of item ``item`` of step ``step`` (1-based) of a run seeded with
    ``seed``: pair ``item`` of the batch, ``item = -1`` for the step's lam and ``-2`` for its
    Dice labels."""
    digest = hashlib.sha256(f"regpipe-train:{seed}:{step}:{item}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def default_workers(device: torch.device) -> int:
    """Drawing threads when none are asked for: ``min(8, CPUs - 1)`` on a GPU (the CPUs this
    process may use), 0 on the CPU, where the training step needs every core."""
    from regpipe.device import available_cpus

    return min(8, max(1, available_cpus() - 1)) if device.type == "cuda" else 0


class PairStream:
    """The pairs of each step of a run, drawn ``workers`` threads ahead (on demand with 0).

    Sources only read their data and the generator they are given, so drawing in threads is
    safe; torch releases the GIL in the resampling and filtering that dominate a draw.
    Nothing is drawn past ``last_step``. ``waited`` adds up the seconds :meth:`pairs` spent
    drawing or waiting; :meth:`close` stops the threads.
    """

    def __init__(self, source: PairSource, shape: tuple[int, int, int], *, seed: int,
                 batch_size: int, workers: int, last_step: int) -> None:
        self.source, self.shape = source, shape
        self.seed, self.batch_size, self.last_step = seed, batch_size, last_step
        self.executor = (ThreadPoolExecutor(workers, thread_name_prefix="regpipe-pairs")
                         if workers else None)
        # enough steps in flight to keep every worker busy, and at least the next one
        self.ahead = max(2, math.ceil(2 * workers / batch_size))
        self.pending: deque[tuple[int, list[Future[TrainingPair]]]] = deque()
        self.waited = 0.0

    def _draw(self, step: int, item: int) -> TrainingPair:
        return self.source.draw(self.shape, pair_generator(self.seed, step, item))

    def pairs(self, step: int) -> list[TrainingPair]:
        """The pairs of ``step`` (steps are asked for in increasing order)."""
        started = time.perf_counter()
        try:
            if self.executor is None:
                return [self._draw(step, i) for i in range(self.batch_size)]
            while self.pending and self.pending[0][0] < step:
                self.pending.popleft()
            following = self.pending[-1][0] + 1 if self.pending else step
            while len(self.pending) < self.ahead and following <= max(step, self.last_step):
                futures = [self.executor.submit(self._draw, following, i)
                           for i in range(self.batch_size)]
                self.pending.append((following, futures))
                following += 1
            _, futures = self.pending.popleft()
            return [future.result() for future in futures]
        finally:
            self.waited += time.perf_counter() - started

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
