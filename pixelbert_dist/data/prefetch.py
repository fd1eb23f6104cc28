"""Receive the loader workers' batches in a background thread of the training process.

    for batch in in_background(map(receive, iter(dataloader)), depth=2):
        ...

Taking a batch from a DataLoader worker costs the training process ~2-3 ms of its own time on
a small CPU batch (a socket round trip per shared tensor, unpickling): time the step waits
even when the worker is ahead. A thread spends it while the model computes (torch releases
the GIL inside its kernels), so the step only waits when the workers are behind.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked thread checks whether the consumer has gone


def in_background(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items`, taken up to `depth` ahead by a thread; its errors are raised here, in order.

    Closing this generator (or breaking out of it) stops the thread before it returns.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over((item, None)):
                    return
            hand_over((None, StopIteration()))
        except BaseException as err:  # a worker's error reaches the training loop, not a log
            hand_over((None, err))

    thread = threading.Thread(target=produce, name="loader-receive", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if isinstance(error, StopIteration):
                return
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()
        # a thread blocked in next(items) finishes with that item; the DataLoader's own timeouts
        # bound the wait, and a daemon thread never holds up the process's exit
        thread.join(timeout=60)
