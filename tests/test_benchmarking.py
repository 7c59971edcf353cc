"""The benchmarks' memory measure (experiments/benchmarking.py): the live-memory peak of a step
is the most memory alive at once in it, even where glibc's default allocator keeps freed memory
resident."""
import textwrap

import allocator
from benchmarking import ROOT, run_isolated

WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {experiments!r})
    import torch
    from benchmarking import measure, worker_output

    def step():
        # At most 40 MiB alive at once: a freed 16 MiB block too small for the 24 MiB one after
        # it is a hole the default allocator keeps resident.
        a = torch.ones(4 * 2 ** 20)  # 16 MiB
        b = torch.ones(4 * 2 ** 20)
        del a
        c = torch.ones(6 * 2 ** 20)  # 24 MiB
        del b, c

    worker_output(measure(step, repeats=1))
""")


def test_live_memory_is_the_peak_of_the_memory_alive(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(experiments=str(ROOT / "experiments")))
    # (glibc's default allocator gives about 56 MiB here: the hole stays resident.)
    live = run_isolated(script, [], allocator.LIVE)["peak_mib"]
    assert 39 < live < 44, live
