"""Tasks claimed from a shared counter inside a parallel region (fastconv.cpu.task_queue)."""
import numpy as np
import pytest
from numba import njit, prange

from fastconv.cpu import task_queue


@njit(parallel=True, cache=False)
def _claim_all(counter, tasks, workers, claimed, taken):
    for worker in prange(workers):
        while True:
            t = task_queue.claim(counter)
            if t >= tasks:
                break
            claimed[worker, taken[worker]] = t  # each worker's own row: no shared writes
            taken[worker] += 1


@pytest.mark.parametrize("tasks", [0, 1, 2, 7, 1000])
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_every_task_is_claimed_exactly_once(tasks, workers):
    counter = task_queue.counter()
    claimed = np.full((workers, tasks), -1, np.int64)
    taken = np.zeros(workers, np.int64)
    _claim_all(counter, tasks, workers, claimed, taken)
    got = np.concatenate([claimed[w, :taken[w]] for w in range(workers)])
    assert sorted(got.tolist()) == list(range(tasks))
    # each worker claims past the end once when it stops
    assert counter[0] == tasks + workers


@njit(cache=False)
def _claims(counter, n):
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = task_queue.claim(counter)
    return out


def test_claims_count_up_from_the_counter():
    counter = task_queue.counter()
    assert counter.dtype == np.int64 and counter.shape == (1,) and counter[0] == 0
    assert list(_claims(counter, 4)) == [0, 1, 2, 3]
    assert list(_claims(counter, 2)) == [4, 5]


def test_claim_refuses_other_counters():
    from numba.core.errors import TypingError
    with pytest.raises(TypingError):
        _claims(np.zeros(1, np.int32), 1)
