"""The thread that receives batches from the loader workers (pixelbert_dist/data/prefetch.py)."""

import itertools
import threading
import time

import pytest

from pixelbert_dist.data.prefetch import in_background


def _receivers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "loader-receive"]


def test_items_arrive_in_order_and_an_error_arrives_after_them():
    def items():
        yield from range(5)
        raise ValueError("shard 000003.tar: truncated member")

    received = []
    with pytest.raises(ValueError, match="000003.tar"):
        for item in in_background(items(), depth=2):
            received.append(item)
    assert received == list(range(5))
    assert not _receivers()


def test_closing_stops_the_thread_and_it_reads_no_further_than_depth_ahead():
    taken = itertools.count()
    produced = []

    def endless():
        for i in taken:
            produced.append(i)
            yield i

    stream = in_background(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    time.sleep(0.3)  # let the thread fill the queue
    # 3 handed out, 2 waiting in the queue, 1 held by the thread blocked on the full queue
    assert len(produced) <= 3 + 2 + 1
    stream.close()
    assert not _receivers()
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count
