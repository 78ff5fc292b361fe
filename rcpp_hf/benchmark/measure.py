"""Per-token timing through the streamer interface, and peak memory (allocator peak on CUDA, RSS on CPU)."""

from __future__ import annotations

import os
import threading
import time

import torch
from transformers.generation.streamers import BaseStreamer

_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def resident_bytes(device: torch.device | str) -> int:
    """Memory held now: the CUDA allocator's allocated bytes, or this process's resident set size on CPU."""
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()


class StepTimer(BaseStreamer):
    """A streamer that timestamps `generate`'s calls, with `start()` called just before `generate`.

    The first `put` is the prompt; each later one a generated token, which `generate` hands over after moving it to
    the host, i.e. after the device finished. The prefill runs from `start()`, not from the prompt's `put`:
    `generate` encodes the images before that `put`, except for methods that encode them inside the decoding loop
    (vision-side pruners, VCD), so only the call's start times the vision tower the same way for every method.
    """

    def __init__(self):
        self.started: float | None = None
        self.stamps: list[float] = []
        self.rss: list[int] = []

    def start(self) -> None:
        self.started = time.perf_counter()

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())
        self.rss.append(current_rss())

    def end(self) -> None:
        pass

    @property
    def prefill_seconds(self) -> float:
        """From `start()` to the first generated token: image encoding, the prompt's forward, the first choice."""
        if self.started is None:
            raise RuntimeError("StepTimer.start() must be called just before generate")
        return self.stamps[1] - self.started

    @property
    def total_seconds(self) -> float:
        """From `start()` to the last generated token."""
        return self.stamps[-1] - self.started

    @property
    def decode_seconds(self) -> list[float]:
        """Seconds per decoded token, for tokens 2..n (token 1 comes from the prefill)."""
        return [after - before for before, after in zip(self.stamps[1:], self.stamps[2:])]


class PeakMemory:
    """Peak memory during a block, in bytes: the CUDA allocator's peak, or the process's RSS sampled every
    `interval` seconds (the RSS high-water mark of the OS would carry over from earlier blocks)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = torch.device(device), interval
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = current_rss()
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self._peak = max(self._peak, current_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._running = False
            self._thread.join()
            self.peak_bytes = max(self._peak, current_rss())
        return False
