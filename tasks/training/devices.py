"""Which device each trial trains on, and how many trials share it.

A GPU node runs trials concurrently, `trials_per_device` at a time on each GPU; a trial takes a
slot, trains, and gives it back, so a sweep of many trials keeps every GPU busy without a
scheduler of our own. A CPU runs one trial at a time with all its cores: two trials side by side
on 2 cores were no faster than one after the other, and each would slow the other down.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch


def resolve_devices(device: str) -> list[str]:
    """The devices a sweep may use: 'auto' and 'cuda' take every visible GPU, else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return ["cpu"]
    if device in ("auto", "cuda"):
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return [device]


def slots_per_device(devices: list[str], trials_per_device: int) -> int:
    return 1 if devices == ["cpu"] else trials_per_device


def configure_cpu_threads(devices: list[str]) -> int:
    """Give intra-op parallelism all cores when the trials run on the CPU (one at a time)."""
    if devices != ["cpu"]:
        return torch.get_num_threads()
    threads = max(1, len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def trial_stream(device: str) -> Iterator[None]:
    """On a GPU, the calling thread's work goes to a CUDA stream of its own; elsewhere a no-op.

    Trials sharing a GPU run in threads. On the one default stream their kernels would queue
    behind each other, and every read-back (`.item()`, the divergence check) of one trial would
    wait for the others' queued work; on a stream each, small trials overlap on the GPU. The
    current stream is per thread, so each trial thread sets its own.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device=device)
    # The dataset was copied to the device on the default stream: this stream starts after it.
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    # What the trial produced (weights, metrics) is complete before another stream reads it.
    stream.synchronize()


class DeviceSlots:
    """A pool of (device, slot) places; `take()` blocks until one is free. The flow makes one per
    sweep and hands it to every task that trains or evaluates."""

    def __init__(self, devices: list[str], per_device: int):
        self.devices = list(devices)
        self.per_device = per_device
        self._free = [device for _ in range(per_device) for device in devices]
        self._condition = threading.Condition()

    @contextlib.contextmanager
    def take(self) -> Iterator[str]:
        with self._condition:
            self._condition.wait_for(lambda: bool(self._free))
            device = self._free.pop(0)
        try:
            yield device
        finally:
            with self._condition:
                self._free.append(device)
                self._condition.notify()
