"""Facts about the machine a benchmark runs on: CPU model and the process's peak memory."""

from __future__ import annotations

import platform
import resource


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mib() -> float:
    """Return the peak resident set size of this process in MiB (VmHWM, or ru_maxrss where /proc is missing).

    VmHWM is this process's own peak; ru_maxrss of a child process can carry
    the parent's peak across exec.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
