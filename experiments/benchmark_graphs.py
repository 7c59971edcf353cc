"""Cost of the graph builders: SVGA per forward (a cache hit) and the chunked kNN builder against a
plain torch.cdist + topk, interleaved, each kNN case in a fresh process. Results go to
docs/benchmarks.md.

    python experiments/benchmark_graphs.py [--rounds 3] [--repeats 5]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarking import (environment, markdown_table, measure, run_isolated, update_section,
                          worker_output)

KNN_CASES = {
    "vig_ti": dict(label="ViG-Ti: 196 nodes (14x14), batch 64, C=192", shape=(64, 192, 14, 14)),
    "large": dict(label="4096 nodes (64x64), batch 8, C=96", shape=(8, 96, 64, 64)),
}
BUILDERS = ["attvig_pyg knn_graph", "torch.cdist + topk"]
K = 9


def plain_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """The straightforward version: all pairwise distances of each image at once."""
    features = F.normalize(x.flatten(2).transpose(1, 2), dim=-1)
    return torch.cdist(features, features).topk(k, dim=-1, largest=False).indices


def worker(case: str, builder: str, repeats: int) -> None:
    from attvig_pyg.graphs import knn_graph

    torch.manual_seed(0)
    x = torch.randn(KNN_CASES[case]["shape"])
    build = {"attvig_pyg knn_graph": lambda: knn_graph(x, K),
             "torch.cdist + topk": lambda: plain_knn(x, K)}[builder]
    with torch.no_grad():
        worker_output(measure(build, repeats))


def svga_cache_hit_us(repeats: int) -> tuple:
    from attvig_pyg.graphs import svga_graph

    start = time.perf_counter()
    svga_graph(64, 56, 56, 8)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        svga_graph(64, 56, 56, 8)
    return first * 1e6, (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "BUILDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.repeats)

    first_us, hit_us = svga_cache_hit_us(1000)
    best = {}
    for round_number in range(args.rounds):
        for case in KNN_CASES:
            for builder in BUILDERS:
                result = run_isolated(Path(__file__), [case, builder, "--repeats",
                                                       str(args.repeats)])
                print(f"round {round_number + 1}/{args.rounds} {case} {builder}: "
                      f"{result['time_s'] * 1000:.1f} ms, {result['peak_mib']:.0f} MiB",
                      flush=True)
                previous = best.get((case, builder), result)
                best[(case, builder)] = {key: min(previous[key], result[key]) for key in result}

    rows = []
    for case in KNN_CASES:
        peer = best[(case, BUILDERS[1])]
        for builder in BUILDERS:
            result = best[(case, builder)]
            rows.append([KNN_CASES[case]["label"], builder, f"{result['time_s'] * 1000:.1f}",
                         f"{result['time_s'] / peer['time_s']:.2f}x",
                         f"{result['peak_mib']:.0f}",
                         f"{result['peak_mib'] / max(peer['peak_mib'], 1e-9):.2f}x"])
    table = markdown_table(["case", "builder", "ms", "time vs cdist", "peak MiB",
                            "memory vs cdist"], rows)
    command = "python experiments/benchmark_graphs.py " + " ".join(sys.argv[1:])
    body = (f"Command: `{command.strip()}` ({environment()}).\n\n"
            f"**SVGA** edges for a batch of 64 at 56x56 (K=8, 2.4M edges): {first_us / 1000:.1f} ms "
            f"for the first call, then **{hit_us:.1f} us per forward** (a cache hit, mean of 1000 "
            f"calls).\n\n"
            f"**kNN** (k={K}, dilation 1): `knn_graph` with its default 256 MiB budget against "
            f"all pairwise distances at once (`torch.cdist` + `topk`), best of {args.rounds} "
            f"interleaved rounds x {args.repeats} calls, each case in a fresh process; memory is "
            "the peak RSS of one call minus the RSS before it.\n\n" + table)
    update_section("Graph builders", body)
    print(body)


if __name__ == "__main__":
    main()
