"""cxrbench._threads: the interactive thread count follows the free cores."""

from __future__ import annotations

import pytest
import torch

from cxrbench._threads import THREADS_ENV, interactive_threads, use_interactive_threads


@pytest.mark.parametrize(("cores", "load", "expected"), [
    (2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 1.3, 1), (2, 5.5, 1), (2, 12.0, 1),  # one busy process: 1 thread
    (8, 0.2, 8), (8, 3.0, 5), (8, 9.0, 1), (1, 0.0, 1),
])
def test_the_count_is_the_free_cores_at_least_one(cores, load, expected):
    assert interactive_threads(cores=cores, load=load, environ={}) == expected


def test_the_environment_fixes_the_count_and_a_bad_value_is_named():
    assert interactive_threads(cores=2, load=9.0, environ={THREADS_ENV: "2"}) == 2
    assert interactive_threads(cores=2, load=0.0, environ={THREADS_ENV: "0"}) == 0
    with pytest.raises(ValueError, match=f"{THREADS_ENV}='two'"):
        interactive_threads(environ={THREADS_ENV: "two"})


def test_use_sets_torchs_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(THREADS_ENV, "1")
        assert use_interactive_threads() == 1 == torch.get_num_threads()
        monkeypatch.setenv(THREADS_ENV, "0")  # 0: leave torch's setting alone
        torch.set_num_threads(2)
        assert use_interactive_threads() == 2
    finally:
        torch.set_num_threads(before)
