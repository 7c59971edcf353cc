"""glibc's malloc settings for the programs: one for speed (training runs, profiles and
every benchmark's timing), one for measuring the memory in use.

With glibc's defaults a large freed block may go back to the system (unmapped, or trimmed off
the top of the heap), and the next tensor of that size is then mapped anew: every page faulted
in and zeroed by the kernel. On this project's 2-core machine that cost resnet50's inference at
batch 16 about a third of its time (15-17 img/s against 23-27 with ``FAST``) and an
AttentionViG-S training step 60-160 thousand page faults, and it made single timings move by up
to 15 % between fresh processes (docs/benchmarks.md). ``FAST`` never maps a block of its own
and keeps up to 1 GiB of freed memory at the heap's top, so a step reuses the last step's
memory; the process's resident size then stays at its high-water mark. ``LIVE`` does the
opposite, every block over 64 KiB mapped when allocated and unmapped when freed, so that the
peak resident size is the peak of the memory alive (benchmarking.run_isolated).
"""
import ctypes
from typing import Dict

__all__ = ["FAST", "LIVE", "apply", "environment"]

FAST = {"MMAP_MAX": 0, "TRIM_THRESHOLD": 2 ** 30}
LIVE = {"MMAP_THRESHOLD": 64 * 2 ** 10}

# mallopt's parameter numbers (malloc.h); the environment variables are MALLOC_<NAME>_.
_MALLOPT = {"TRIM_THRESHOLD": -1, "MMAP_THRESHOLD": -3, "MMAP_MAX": -4}


def environment(settings: Dict[str, int]) -> Dict[str, str]:
    """The environment variables that give a new process ``settings`` from its start."""
    return {f"MALLOC_{name}_": str(value) for name, value in settings.items()}


def apply(settings: Dict[str, int]) -> bool:
    """Gives this process's allocator ``settings`` (for the allocations to come); False where
    the C library is not glibc or refuses one of them."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(_MALLOPT[name], value) == 1 for name, value in settings.items())
