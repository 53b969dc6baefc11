"""How many threads one interactive report (the dashboard, a notebook's ``Pipeline.analyze``) should use.

PyTorch's CPU kernels split each layer across an OpenMP team and wait for its slowest thread. On a machine
whose cores are all taken by other processes a second thread waits for a core most of the time, and a report
got several times slower at 2 threads than at 1 (README, "Threads"). So the count follows the cores that are
free now: the cores this process may run on minus the 1-minute load average, rounded, at least 1. On an idle
2-core machine that is 2, with one busy process beside us 1. ``OMP_WAIT_POLICY`` is left alone: at 1 thread
there is no team to spin, and ``PASSIVE`` costs about 1.9x on a quiet machine.

``CXRBENCH_THREADS=N`` fixes the count (``0``: leave torch's own setting).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

__all__ = ["THREADS_ENV", "interactive_threads", "use_interactive_threads"]

#: the environment variable that fixes the interactive thread count
THREADS_ENV = "CXRBENCH_THREADS"


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def interactive_threads(*, cores: int | None = None, load: float | None = None,
                        environ: Mapping[str, str] | None = None) -> int:
    """The thread count for one interactive report (see the module doc); 0 means "leave torch's setting".

    ``cores`` (default :func:`available_cores`), ``load`` (default the 1-minute load average) and ``environ``
    (default ``os.environ``) are parameters so that the rule can be tested. A ``CXRBENCH_THREADS`` that is not
    a whole number >= 0 is a ``ValueError`` naming the variable.
    """
    env = os.environ if environ is None else environ
    fixed = env.get(THREADS_ENV, "").strip()
    if fixed:
        if not fixed.isdigit():
            raise ValueError(f"{THREADS_ENV}={fixed!r}: expected a whole number of threads >= 0 (0: torch's own)")
        return int(fixed)
    cores = available_cores() if cores is None else cores
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
