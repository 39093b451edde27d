"""An ordered parallel map over forked worker processes that an interrupt can always stop.

``multiprocessing.Pool.terminate()`` takes its shared input-queue lock before it kills the
workers, and a worker waiting for a task holds that lock, so Ctrl-C during packing could hang
forever. Here every worker has its own pipe: no lock is shared, and stopping is killing.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from collections import deque
from typing import Callable, Iterable, Iterator

_END = object()


def _serve(fn: Callable, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent stops us
    try:
        while (item := conn.recv()) is not None:
            conn.send(fn(item))
    except (EOFError, BrokenPipeError):  # the parent is gone
        pass


def ordered_map(fn: Callable, items: Iterable, workers: int, depth: int = 8) -> Iterator:
    """``map(fn, items)`` on ``workers`` forked processes, results in input order, at most
    ``depth`` items in flight per worker. ``fn`` and the items must be picklable; the workers
    are killed when the iteration ends early for any reason (an exception, Ctrl-C, ``close()``)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    ctx = mp.get_context("fork")  # workers start at once (spawn would re-import torch)
    items = iter(items)
    procs, conns = [], []
    try:
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(fn, child), daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        pending: deque[int] = deque()  # the worker of each item in flight, in input order
        sent = 0

        def send_next() -> None:
            nonlocal sent
            item = next(items, _END)
            if item is not _END:
                conns[sent % workers].send(item)
                pending.append(sent % workers)
                sent += 1

        for _ in range(workers * depth):
            send_next()
        while pending:
            result = conns[pending.popleft()].recv()  # each worker answers in the order it was asked
            send_next()
            yield result
        for conn in conns:
            conn.send(None)
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        for conn in conns:
            conn.close()
