"""What the benchmark programs (and the ablation script) share: isolated measurements, the
multiply-add count of record (attvig_pyg.models.complexity) and the docs/benchmarks.md writer.

Memory is the peak resident set size (VmHWM) of a fresh process during one step, minus the
resident size just before it: the extra memory the step needed, activations and workspace
included. Before that step, a warm-up step has run (one-time allocations: optimizer state,
kernel caches) and the memory it freed has been handed back to the system (``malloc_trim``), so
that the measured step cannot hide in memory the allocator kept.

Workers run with the allocator the training programs use (``allocator.FAST``: freed memory
stays in the heap for reuse), so that timings leave out the kernel's page faults; the peak RSS
then includes what the heap keeps of freed blocks. ``run_isolated(..., malloc=allocator.LIVE)``
measures the memory alive instead: every block over 64 KiB is mapped when allocated and
unmapped when freed, so the peak RSS is the peak of the memory in use. Each page is then
faulted in anew on every allocation, so that process's times are not comparable and only its
memory is used. ``malloc={}`` gives glibc's defaults.

On a GPU (``device="cuda"``) the device is synchronised before and after each timed step (the
launches are asynchronous), and memory is the peak of the memory torch's CUDA allocator had in
use during the step minus what it had in use before it.
"""
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import allocator
from attvig_pyg.models.complexity import multiply_adds  # noqa: F401  (the programs' MAC count)

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure(step: Callable[[], None], repeats: int, device: str = "cpu") -> Dict[str, float]:
    """Runs ``step`` once to warm up, once for memory, ``repeats`` times for time (best)."""
    if torch.device(device).type == "cuda":
        return _measure_cuda(step, repeats)
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_s": min(times), "peak_mib": (peak - before) / 1024}


def _measure_cuda(step: Callable[[], None], repeats: int) -> Dict[str, float]:
    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"time_s": min(times), "peak_mib": (peak - before) / 2**20}


def check_device(device: str) -> str:
    """``device`` if a benchmark can run on it here; a clear SystemExit otherwise."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    if torch.device(device).type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {device}: the benchmarks run on cpu or cuda")
    return device


def run_isolated(script: Path, args: List[str], malloc: Dict[str, int] = allocator.FAST,
                 library: Optional[Path] = None) -> Dict[str, float]:
    """Runs ``script --worker ARGS`` in a fresh interpreter, its allocator set up with
    ``malloc`` (allocator.py; see above), and returns the JSON it prints last. ``library``: a
    checkout whose ``attvig_pyg`` the worker imports instead of this one's (an A/B against
    another commit)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    if library is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(library), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(script), "--worker", *args],
                            capture_output=True, text=True, check=False,
                            env=dict(env, **allocator.environment(malloc)))
    if result.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker_output(values: Dict[str, float]) -> None:
    print(json.dumps(values), flush=True)


def environment() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{time.strftime('%Y-%m-%d')}")


def update_section(title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replaces (or appends) the ``## title`` section of the benchmarks page."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
