"""The packing workers' ordered map: input order under uneven work, and nothing left running
when the consumer stops early."""

import multiprocessing as mp
import time

from liqe_dist.data.parallel import ordered_map


def slow_square(x: int) -> int:
    time.sleep(0.02 if x % 3 == 0 else 0.0)  # uneven work: later items often finish first
    return x * x


def test_results_come_in_input_order():
    assert list(ordered_map(slow_square, range(60), workers=3, depth=2)) == [x * x for x in range(60)]
    assert list(ordered_map(slow_square, range(5), workers=1)) == [0, 1, 4, 9, 16]
    assert list(ordered_map(slow_square, [], workers=2)) == []


def test_stopping_early_kills_the_workers():
    results = ordered_map(slow_square, range(1000), workers=2)
    assert next(results) == 0
    assert len(mp.active_children()) == 2
    results.close()
    assert mp.active_children() == []
