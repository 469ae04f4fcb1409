"""Peak memory of a benchmark process, shared by the benchmark scripts."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: that one keeps the parent's peak across fork+exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
