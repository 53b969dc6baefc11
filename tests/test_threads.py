"""cxrbench._threads: the interactive thread count follows the cores the other processes leave free."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

import cxrbench._threads as threads_mod
from cxrbench._threads import (
    FIRST_SAMPLE_S,
    THREADS_ENV,
    CpuSample,
    OtherDemand,
    available_cores,
    interactive_threads,
    use_interactive_threads,
)


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


# ------------------------------------------------------------------ the other processes' demand, injected numbers

class FakeClock:
    """Per-CPU times as a script says: each read returns the next (t, busy, own) and a sleep advances nothing."""

    def __init__(self, *samples: tuple[float, float, float], pid: int = 1):
        self.samples, self.pid, self.sleeps = list(samples), pid, []

    def read(self, cpus):
        t, busy, own = self.samples.pop(0)
        return CpuSample(t, busy, own, tuple(cpus), self.pid)

    def sleep(self, seconds):
        self.sleeps.append(seconds)


def test_the_first_call_samples_and_this_processs_own_work_does_not_count():
    clock = FakeClock((0.0, 100.0, 5.0), (0.1, 100.2, 5.0),  # first call: 0.1 s, 2 cores busy, none of it ours
                      (1.1, 102.2, 7.0),  # 1 s: both cores busy, all of it this process's
                      (2.1, 103.7, 8.0))  # 1 s: 1.5 cores busy, 1 ours: the others 0.5
    demand = OtherDemand(read=clock.read, sleep=clock.sleep)
    assert demand((0, 1)) == pytest.approx(2.0) and clock.sleeps == [FIRST_SAMPLE_S]
    assert demand((0, 1)) == pytest.approx(0.0)
    assert interactive_threads(cores=2, load=0.0, environ={}) == 2
    assert demand((0, 1)) == pytest.approx(0.5) and clock.sleeps == [FIRST_SAMPLE_S]  # no more sampling


def test_a_call_too_soon_repeats_the_answer_and_the_next_measures_from_the_older_sample():
    clock = FakeClock((0.0, 0.0, 0.0), (0.1, 0.1, 0.0),  # first call: 1 core of others
                      (0.13, 0.13, 0.03),  # 30 ms later: too few ticks, the answer repeats
                      (0.6, 0.6, 0.5))  # from 0.1 s: 0.5 s busy, 0.5 s ours: the others gave their core back
    demand = OtherDemand(read=clock.read, sleep=clock.sleep)
    assert demand((0, 1)) == pytest.approx(1.0)
    assert demand((0, 1)) == pytest.approx(1.0)
    assert demand((0, 1)) == pytest.approx(0.0)


def test_a_forked_child_or_new_affinity_samples_afresh_and_the_answer_stays_within_the_cores():
    clock = FakeClock((0.0, 0.0, 0.0), (0.1, 0.5, 0.0),  # 5 cores busy on 2: tick noise, at most the 2 cores
                      (0.2, 0.5, 0.0), (0.3, 0.5, 0.0))  # the child (another pid): a new sample, all idle
    demand = OtherDemand(read=clock.read, sleep=clock.sleep)
    assert demand((0, 1)) == 2.0
    clock.pid = 2
    assert demand((0, 1)) == 0.0 and clock.sleeps == [FIRST_SAMPLE_S] * 2


def test_without_per_cpu_times_the_load_average_stands_in(monkeypatch):
    monkeypatch.setattr(threads_mod, "other_demand", OtherDemand(read=lambda cpus: None))
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert interactive_threads(cores=2, environ={}) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.0, 0.0))
    assert interactive_threads(cores=2, environ={}) == 2


# ------------------------------------------------------------------ real processes

#: the slack of per-CPU times (they tick at 10 ms) over a 0.1-1 s window, in cores
TICKS = 0.3


def _child_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def test_a_busy_child_process_leaves_one_core_fewer():
    cores = available_cores()
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        proc = psutil.Process(child.pid)
        deadline = time.monotonic() + 30
        while _child_cpu(proc) < 0.1:  # started and spinning
            assert time.monotonic() < deadline, "the busy-loop child never ran"
            time.sleep(0.02)
        demand = OtherDemand()
        first = demand()  # the first call's short sample
        c0 = _child_cpu(proc)
        time.sleep(0.5)
        second = demand()  # over the 0.5 s since
        child_rate = (_child_cpu(proc) - c0) / 0.5
    finally:
        child.kill()
        child.wait()
    # while this process sleeps, the child (or whoever takes its core) keeps at least one core busy
    assert first is not None and second is not None
    assert first >= 0.5 and second >= max(1.0, child_rate) - TICKS, (first, second, child_rate)
    for load in (first, second):
        assert interactive_threads(cores=cores, load=load, environ={}) <= max(1, cores - 1)
    if cores == 2:
        assert interactive_threads(cores=2, load=second, environ={}) == 1


def _spin(stop: threading.Event) -> None:
    block = os.urandom(1 << 22)
    while not stop.is_set():
        hashlib.sha256(block).digest()  # hashlib lets go of the GIL for a large buffer: a core per thread


def test_this_processs_own_busy_threads_do_not_count_as_other_processes():
    cores = available_cores()
    me = psutil.Process()
    demand = OtherDemand()
    assert demand() is not None
    stop = threading.Event()
    spinners = [threading.Thread(target=_spin, args=(stop,)) for _ in range(cores)]
    t0, own0 = time.monotonic(), sum(me.cpu_times()[:2])
    for s in spinners:
        s.start()
    while sum(me.cpu_times()[:2]) - own0 < 1.0 * cores and time.monotonic() - t0 < 20:  # a busy machine: longer
        time.sleep(0.05)
    stop.set()
    for s in spinners:
        s.join()
    during = demand()  # over the spin: this process kept the cores busy
    own = sum(me.cpu_times()[:2]) - own0
    own_rate = own / (time.monotonic() - t0)
    assert during is not None
    assert own >= 1.0, f"the spinning threads got only {own:.2f} CPU seconds in 20 s"
    # the cores hold at most `cores` of work: what this process did cannot have been the others'
    assert during <= cores - own_rate + TICKS, (during, own_rate)
    # so the count is at least the cores this process itself kept busy (all of them on a quiet machine)
    assert interactive_threads(cores=cores, load=during, environ={}) >= max(1, math.floor(own_rate - TICKS + 0.5))
