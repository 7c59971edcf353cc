"""AttentionViG-S/M/B against timm's resnet50, efficientformerv2_s2 and fastvit_sa12 on the CPU:
parameters, multiply-adds, inference throughput (batch 16, 224 px), training-step throughput and
peak memory (batch 8, with and without gradient checkpointing), and AttentionViG-S's cost against
input size (batch 1, from 224 px to detection sizes), whole and as a feature extractor beside
resnet50's. Every measurement runs in a fresh process; the models are interleaved and the best of
the rounds is kept. Results go to docs/benchmarks.md.

    python experiments/benchmark_backbone.py [--rounds 3] [--repeats 3]
"""
import argparse
import sys
from pathlib import Path

import torch

from benchmarking import (environment, markdown_table, measure, multiply_adds, run_isolated,
                          update_section, worker_output)

MODELS = ["attentionvig_s", "attentionvig_m", "attentionvig_b", "resnet50",
          "efficientformerv2_s2", "fastvit_sa12"]
PEER = "resnet50"
# Classification sizes, then the detection and segmentation inputs (Mask R-CNN 800x1216 and
# 1333x800, Semantic FPN 512x512), height x width.
RESOLUTIONS = ["224x224", "320x320", "448x448", "512x512", "640x640", "800x1216", "1333x800"]
INFERENCE_BATCH, TRAIN_BATCH = 16, 8


def create(name: str, features_only: bool = False) -> torch.nn.Module:
    import timm

    import attvig_pyg  # noqa: F401  (registers AttentionViG with timm)
    if features_only:
        return timm.create_model(name, features_only=True)
    return timm.create_model(name, num_classes=1000)


def parse_size(text: str):
    height, width = map(int, text.split("x"))
    return height, width


def worker(task: str, name: str, size: str, repeats: int) -> None:
    torch.manual_seed(0)
    height, width = parse_size(size)
    model = create(name, features_only=task == "features")
    if task in ("inference", "scaling", "features"):
        model.eval()
        images = torch.randn(INFERENCE_BATCH if task == "inference" else 1, 3, height, width)

        def step():
            with torch.no_grad():
                model(images)
        result = measure(step, repeats)
        result["images_per_s"] = images.size(0) / result["time_s"]
        if task == "scaling":
            result["macs"] = multiply_adds(model, (height, width))
    else:
        model.train()
        if task == "train_checkpointed":
            model.set_grad_checkpointing(True)
        images = torch.randn(TRAIN_BATCH, 3, height, width)
        labels = torch.randint(0, 1000, (TRAIN_BATCH,))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        result = measure(step, repeats)
        result["images_per_s"] = TRAIN_BATCH / result["time_s"]
    worker_output(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("TASK", "MODEL", "SIZE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        task, name, size = args.worker
        return worker(task, name, size, args.repeats)

    sizes = {}
    for name in MODELS:
        model = create(name)
        sizes[name] = (sum(p.numel() for p in model.parameters()), multiply_adds(model, 224))

    runs = [(task, name, "224x224") for name in MODELS for task in ("inference", "train")]
    runs += [("train_checkpointed", name, "224x224") for name in ("attentionvig_s", PEER)]
    runs += [("scaling", "attentionvig_s", size) for size in RESOLUTIONS]
    runs += [("features", name, size) for size in RESOLUTIONS
             for name in ("attentionvig_s", PEER)]
    best = {}
    for round_number in range(args.rounds):
        for run in runs:
            result = run_isolated(Path(__file__), [*map(str, run), "--repeats",
                                                   str(args.repeats)])
            print(f"round {round_number + 1}/{args.rounds} {run}: "
                  f"{result['images_per_s']:.1f} img/s, {result['peak_mib']:.0f} MiB", flush=True)
            previous = best.get(run, result)
            best[run] = dict(result, images_per_s=max(previous["images_per_s"],
                                                      result["images_per_s"]),
                             peak_mib=min(previous["peak_mib"], result["peak_mib"]))

    peer_inference = best[("inference", PEER, "224x224")]["images_per_s"]
    peer_train = best[("train", PEER, "224x224")]
    rows = []
    for name in MODELS:
        inference, train = best[("inference", name, "224x224")], best[("train", name, "224x224")]
        params, macs = sizes[name]
        rows.append([name, f"{params / 1e6:.2f}", f"{macs / 1e9:.2f}",
                     f"{inference['images_per_s']:.1f}",
                     f"{inference['images_per_s'] / peer_inference:.2f}x",
                     f"{train['images_per_s']:.1f}",
                     f"{train['images_per_s'] / peer_train['images_per_s']:.2f}x",
                     f"{train['peak_mib']:.0f}",
                     f"{train['peak_mib'] / peer_train['peak_mib']:.2f}x"])
    models_table = markdown_table(
        ["model", "params (M)", "MACs (G)", f"inference img/s (batch {INFERENCE_BATCH})",
         "vs resnet50", f"train img/s (batch {TRAIN_BATCH})", "vs resnet50",
         "train peak MiB", "vs resnet50"], rows)

    checkpoint_rows = []
    for name in ("attentionvig_s", PEER):
        plain = best[("train", name, "224x224")]
        saved = best[("train_checkpointed", name, "224x224")]
        checkpoint_rows.append([name, f"{plain['peak_mib']:.0f}", f"{saved['peak_mib']:.0f}",
                                f"{plain['images_per_s']:.1f}", f"{saved['images_per_s']:.1f}"])
    checkpoint_table = markdown_table(
        ["model", "train peak MiB", "with set_grad_checkpointing()", "train img/s",
         "with set_grad_checkpointing()"], checkpoint_rows)

    base = best[("scaling", "attentionvig_s", "224x224")]
    base_pixels = 224 * 224
    base_ratio = (best[("features", PEER, "224x224")]["images_per_s"] /
                  best[("features", "attentionvig_s", "224x224")]["images_per_s"])
    scaling_rows = []
    for size in RESOLUTIONS:
        result = best[("scaling", "attentionvig_s", size)]
        pixels = parse_size(size)[0] * parse_size(size)[1]
        seconds = 1 / result["images_per_s"]
        ratio = (best[("features", PEER, size)]["images_per_s"] /
                 best[("features", "attentionvig_s", size)]["images_per_s"])
        scaling_rows.append([
            size, f"{pixels / base_pixels:.2f}x", f"{result['macs'] / 1e9:.2f}",
            f"{result['macs'] / pixels / (base['macs'] / base_pixels):.3f}x",
            f"{seconds * 1000:.0f}",
            f"{seconds * base['images_per_s'] * base_pixels / pixels:.2f}x",
            f"{ratio:.2f}x", f"{ratio / base_ratio:.2f}x"])
    scaling_table = markdown_table(
        ["input (h x w)", "pixels vs 224", "MACs (G)", "MACs per pixel vs 224",
         "ms per image", "time per pixel vs 224", "features: time vs resnet50",
         "that ratio vs 224's"], scaling_rows)

    command = "python experiments/benchmark_backbone.py " + " ".join(sys.argv[1:])
    body = (
        f"Command: `{command.strip()}` ({environment()}; eager models in their default memory "
        f"layout, untrained weights; best of {args.rounds} interleaved rounds x {args.repeats} "
        "steps, every model and task in a fresh process). MACs: `FlopCounterMode` total / 2, "
        "eval, batch 1, 224 px. Training step: forward, cross-entropy, backward, AdamW step. "
        "Memory: peak RSS of one training step minus the RSS before it.\n\n" + models_table +
        "\n\nGradient checkpointing (timm's `set_grad_checkpointing()`), batch 8:\n\n" +
        checkpoint_table +
        "\n\nAttentionViG-S against input size (inference, batch 1; MACs include the "
        "cross-attention's shifted products, see benchmarking.multiply_adds; features: "
        "`features_only=True` models, all four stages, against timm's resnet50):\n\n"
        + scaling_table)
    update_section("AttentionViG backbone", body)
    print(body)


if __name__ == "__main__":
    main()
