"""A DistributedDataParallel training step of AttentionViG-S with 2 CPU processes (gloo), with the
weights in the layout the training programs give them under DDP (channels-last, the layout of
their gradients) against the default layout, in which DDP copies every conv weight's gradient
into its bucket and warns "Grad strides do not match bucket view strides" (once per process).
Rounds interleaved, each measurement a fresh pair of processes; results to docs/benchmarks.md.

    python experiments/benchmark_ddp.py [--rounds 3] [--steps 8]
"""
import argparse
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarking import environment, markdown_table, update_section

LAYOUTS = ("contiguous", "channels_last")
BATCH, SIZE = 8, 96  # per process


def worker(rank: int, layout: str, steps: int, port: int, results) -> None:
    import timm

    import attvig_pyg.models  # noqa: F401
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    torch.manual_seed(0)
    model = timm.create_model("attentionvig_s", num_classes=10)
    if layout == "channels_last":
        model.to(memory_format=torch.channels_last)
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    images, labels = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 10, (BATCH,))
    times = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps + 2):  # two warm-up steps
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
    if rank == 0:
        results.put((min(times[2:]), sum("Grad strides" in str(w.message) for w in caught)))
    dist.destroy_process_group()


def measure(layout: str, steps: int, port: int):
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(layout, steps, port, results), nprocs=2, join=True)
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    best = {}
    for round_number in range(args.rounds):
        for i, layout in enumerate(LAYOUTS):
            seconds, warned = measure(layout, args.steps, 29500 + 2 * round_number + i)
            print(f"round {round_number + 1}/{args.rounds} {layout}: {seconds:.3f} s per step, "
                  f"{warned} stride warnings", flush=True)
            previous = best.get(layout, (seconds, warned))
            best[layout] = (min(previous[0], seconds), warned)
    base = best["contiguous"][0]
    rows = [[layout, f"{best[layout][0] * 1000:.0f}", f"{best[layout][0] / base:.3f}x",
             str(best[layout][1])] for layout in LAYOUTS]
    command = "python experiments/benchmark_ddp.py " + " ".join(sys.argv[1:])
    body = (f"Command: `{command.strip()}` ({environment()}; 2 processes, gloo, 1 thread each; "
            f"AttentionViG-S, batch {BATCH} per process at {SIZE} px; best step of "
            f"{args.steps} after two warm-up steps, best of {args.rounds} interleaved rounds). "
            "'channels_last': the 4-d weights in the layout of their gradients before DDP is "
            "built (what the training programs do); 'contiguous': as before, each conv weight's "
            "gradient copied into a bucket laid out otherwise, and DDP's warning (given once "
            "per process; the count is rank 0's over all its steps).\n\n" +
            markdown_table(["weights", "step ms", "vs contiguous", "stride warnings"], rows))
    update_section("DistributedDataParallel: weights in their gradients' layout", body)
    print(body)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
