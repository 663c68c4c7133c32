"""Separate tensor pairs on separate threads: results in order, errors where they belong."""

import threading

import pytest
from threadpoolctl import threadpool_info

from alignkit.comparison.workers import in_order


def test_results_come_in_the_items_order_heavy_ones_on_pool_threads():
    seen = {}

    def work(i):
        seen[i] = threading.current_thread().name
        return i * i

    out = list(in_order(work, range(40), heavy=lambda i: i % 3 == 0, workers=2))
    assert out == [i * i for i in range(40)]
    assert all(seen[i].startswith("alignkit-compare") for i in range(0, 40, 3))
    assert all(seen[i] == threading.main_thread().name for i in range(40) if i % 3)


def test_an_error_is_raised_where_its_item_stands():
    done = []

    def work(i):
        if i == 5:
            raise ValueError("bad pair")
        done.append(i)
        return i

    got = []
    with pytest.raises(ValueError, match="bad pair"):
        for value in in_order(work, range(10), heavy=lambda i: i % 2 == 0, workers=2):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]


def test_blas_runs_on_one_thread_while_pairs_are_computed():
    import numpy  # noqa: F401  (its BLAS is what is held)

    def blas_threads(_):
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    assert blas_threads(None), "numpy's wheel ships OpenBLAS: threadpoolctl must see it"
    for threads in in_order(blas_threads, [0, 1], heavy=lambda i: i == 0, workers=2):
        assert threads and set(threads) == {1}
