"""How many threads one interactive report should use: the dashboard sets torch's count by this rule before each
upload and each change of explained finding, and ONNX Runtime sessions opened without a thread count
(``cxrbench.export.runtime``) size their pool by it. ``Pipeline.analyze`` itself leaves torch's setting alone (a
library call that changed a notebook's global thread count would surprise); call :func:`use_interactive_threads`
before it to get the same rule.

PyTorch's CPU kernels split each layer across an OpenMP team and wait for its slowest thread. On a machine
whose cores are all taken by other processes a second thread waits for a core most of the time, and a report
got several times slower at 2 threads than at 1 (README, "Threads"). So the count follows the cores that the
*other* processes leave free: the cores this process may run on minus the cores the other processes kept busy,
rounded, at least 1. On an idle 2-core machine that is 2, with one busy process beside us 1.

The other processes' demand (:class:`OtherDemand`) is the CPU time spent on this process's cores (per-CPU times,
``psutil.cpu_times``) minus this process's own CPU time (``time.process_time``), over the time since the previous
call, divided by that time. The first call (and the first in a forked child) measures a short sample instead;
a call within :data:`MIN_WINDOW_S` of the previous one repeats its answer. Unlike the 1-minute load average, this
leaves out this process's own work: a dashboard that just served a few uploads, or a notebook that just trained,
no longer sees its own load and drops to 1 thread on an idle machine. It measures what the others *used*: after
a long pause a job that started just before the report counts from the next report on (the load average took
about 40 s to show one), and while this process ran more threads than the others left free they got less than
they wanted, so on a larger machine the count can be one too high for a report before it settles. Where per-CPU
times cannot be read, the 1-minute load average stands in (it counts this process too).

``OMP_WAIT_POLICY`` is left alone: at 1 thread there is no team to spin, and ``PASSIVE`` costs about 1.9x on a
quiet machine.

``CXRBENCH_THREADS=N`` fixes the count (``0``: leave torch's own setting).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

__all__ = ["THREADS_ENV", "CpuSample", "OtherDemand", "interactive_threads", "other_demand",
           "use_interactive_threads"]

#: the environment variable that fixes the interactive thread count
THREADS_ENV = "CXRBENCH_THREADS"
#: the first call's sample, in seconds (per-CPU times tick at 10 ms: 0.1 s on 2 cores is 20 ticks)
FIRST_SAMPLE_S = 0.1
#: a call sooner than this after the previous one repeats its answer (too few ticks to measure)
MIN_WINDOW_S = 0.1
#: per-CPU time fields that are not work (``guest`` and ``guest_nice`` are already inside ``user`` / ``nice``)
_NOT_BUSY = ("idle", "iowait", "guest", "guest_nice")


def _cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all of them)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def available_cores() -> int:
    """The number of CPUs this process may run on."""
    return max(1, len(_cpus()))


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment: of everything on ``cpus``, and of this process (``pid``)."""

    t: float
    busy: float
    own: float
    cpus: tuple[int, ...]
    pid: int


def cpu_sample(cpus: Collection[int]) -> CpuSample | None:
    """The busy seconds of ``cpus`` since boot and this process's CPU seconds now; None where the OS has no
    per-CPU times."""
    import psutil

    try:
        per_cpu = psutil.cpu_times(percpu=True)
    except (OSError, NotImplementedError, AttributeError):
        return None
    mine = [per_cpu[i] for i in cpus if i < len(per_cpu)]
    if not mine:
        return None
    busy = sum(sum(v for k, v in c._asdict().items() if k not in _NOT_BUSY) for c in mine)
    return CpuSample(time.monotonic(), busy, time.process_time(), tuple(cpus), os.getpid())


class OtherDemand:
    """The cores the other processes kept busy since the previous call (see the module doc); None where that
    cannot be measured. ``read`` and ``sleep`` are parameters so that the rule can be tested."""

    def __init__(self, read: Callable[[Collection[int]], CpuSample | None] = cpu_sample,
                 sleep: Callable[[float], None] = time.sleep):
        self.read, self.sleep = read, sleep
        self._ref: CpuSample | None = None
        self._last: float | None = None

    def __call__(self, cpus: Collection[int] | None = None) -> float | None:
        cpus = tuple(_cpus() if cpus is None else cpus)
        now = self.read(cpus)
        if now is None:
            return None
        ref = self._ref
        if ref is None or ref.cpus != now.cpus or ref.pid != now.pid:  # first call, new affinity, forked child
            ref, self._last = now, None
            self.sleep(FIRST_SAMPLE_S)
            now = self.read(cpus)
            if now is None:
                return None
        window = now.t - ref.t
        if window < MIN_WINDOW_S and self._last is not None:  # too soon: the reference stays for the next call
            return self._last
        others = ((now.busy - ref.busy) - (now.own - ref.own)) / max(window, 1e-9)
        self._ref, self._last = now, min(float(len(cpus)), max(0.0, others))
        return self._last


#: the process's measurer: its reference sample is the previous call's
other_demand = OtherDemand()


def interactive_threads(*, cores: int | None = None, load: float | None = None,
                        environ: Mapping[str, str] | None = None) -> int:
    """The thread count for one interactive report (see the module doc); 0 means "leave torch's setting".

    ``cores`` (default :func:`available_cores`), ``load`` (the cores the other processes keep busy; default
    :data:`other_demand`, else the 1-minute load average) and ``environ`` (default ``os.environ``) are parameters
    so that the rule can be tested. A ``CXRBENCH_THREADS`` that is not a whole number >= 0 is a ``ValueError``
    naming the variable.
    """
    env = os.environ if environ is None else environ
    fixed = env.get(THREADS_ENV, "").strip()
    if fixed:
        if not fixed.isdigit():
            raise ValueError(f"{THREADS_ENV}={fixed!r}: expected a whole number of threads >= 0 (0: torch's own)")
        return int(fixed)
    cores = available_cores() if cores is None else cores
    if load is None:
        load = other_demand()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows): assume the machine is ours
            load = 0.0
    return int(max(1, min(cores, math.floor(cores - load + 0.5))))


def use_interactive_threads() -> int:
    """Set torch's intra-op threads to :func:`interactive_threads` (when it is not 0); returns torch's count."""
    import torch

    n = interactive_threads()
    if n and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
