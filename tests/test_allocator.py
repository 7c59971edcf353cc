"""experiments/allocator.py: under FAST a freed block is reused without a page fault, whether
the settings come from the environment (benchmark workers) or from apply() (the engine);
glibc's defaults and LIVE map a 64 MiB block anew, faulting in every page."""
import sys
import textwrap

import pytest

import allocator
import imagenet
from benchmarking import ROOT, run_isolated

# Page faults of a second allocation of 64 MiB (above glibc's largest dynamic mmap threshold,
# 32 MiB), every page written, after the first was written and freed.
WORKER = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {experiments!r})
    import allocator
    from benchmarking import worker_output
    if sys.argv[2] == "apply":  # argv: --worker MODE
        assert allocator.apply(allocator.FAST)
    size = 64 * 2 ** 20

    def touch():
        block = bytearray(size)
        block[::4096] = bytes(len(range(0, size, 4096)))  # one write per page
        return block

    touch()  # written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = touch()
    worker_output({{"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}})
""")
PAGES = 64 * 2 ** 20 // 4096


def faults(tmp_path, malloc, mode="env"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(experiments=str(ROOT / "experiments")))
    return run_isolated(script, [mode], malloc)["faults"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_fast_reuses_freed_memory_where_glibc_defaults_and_live_fault_it_in_again(tmp_path):
    assert faults(tmp_path, {}) > PAGES * 0.9
    assert faults(tmp_path, allocator.LIVE) > PAGES * 0.9
    assert faults(tmp_path, allocator.FAST) < PAGES * 0.05
    assert faults(tmp_path, {}, mode="apply") < PAGES * 0.05


def test_environment_names_glibcs_variables():
    assert allocator.environment({"MMAP_MAX": 0, "TRIM_THRESHOLD": 2 ** 30}) == {
        "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 30)}


def test_training_sets_the_fast_allocator(monkeypatch, tmp_path):
    applied = []
    monkeypatch.setattr(allocator, "apply", lambda settings: applied.append(settings) or True)

    def build_run(args, world):  # the engine has set itself up: stop there
        raise RuntimeError("stop here")
    monkeypatch.setattr(imagenet, "build_run", build_run)
    with pytest.raises(RuntimeError, match="stop here"):
        imagenet.main(["--output", str(tmp_path / "run")])
    assert applied == [allocator.FAST]
