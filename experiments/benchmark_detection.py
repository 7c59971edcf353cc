"""Mask R-CNN on AttentionViG-S's feature pyramid against torchvision's resnet50-FPN Mask R-CNN
on the CPU: inference at 800x1216 (batch 1) and a training step at 512x512 (batch 2, a fixed set
of boxes and masks), time and peak memory, every measurement in a fresh process, the two
interleaved and the best of the rounds kept. Results go to docs/benchmarks.md.

    python experiments/benchmark_detection.py [--rounds 3] [--repeats 3]
"""
import argparse
import sys
from pathlib import Path

import torch

from benchmarking import (environment, markdown_table, measure, multiply_adds, run_isolated,
                          update_section, worker_output)

# attentionvig_s: the paper's fine-tuning (every stage, BatchNorm statistics fixed); with
# "-tv": torchvision's resnet50 recipe (3 trainable stages, frozen BatchNorm).
MODELS = ["attentionvig_s", "attentionvig_s-tv", "resnet50"]
PEER = "resnet50"
# (batch, height, width); Mask R-CNN's transform resizes to the task's size and no further.
TASKS = {"inference": (1, 800, 1216), "train": (2, 512, 512)}


def detector(name: str, task: str):
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn

    import attvig_pyg.models  # noqa: F401  (registers the models with timm)
    from attvig_pyg.models import attentionvig_fpn_backbone

    _, height, width = TASKS[task]
    sizes = dict(min_size=min(height, width), max_size=max(height, width))
    if name == PEER:  # torchvision's: frozen BatchNorm, 3 trainable stages
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81,
                                     **sizes)
    import timm
    settings = dict(trainable_stages=3, norm="frozen") if name.endswith("-tv") else {}
    backbone = attentionvig_fpn_backbone(
        timm.create_model(name.removesuffix("-tv"), num_classes=0), **settings)
    return MaskRCNN(backbone, num_classes=81, **sizes)


def targets(batch: int, height: int, width: int):
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        corners = torch.rand(8, 2, generator=generator) * torch.tensor([width, height]) * 0.6
        sizes = 40 + torch.rand(8, 2, generator=generator) * 200
        boxes = torch.cat([corners, corners + sizes], dim=1)
        masks = torch.zeros(8, height, width, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        out.append(dict(boxes=boxes, labels=torch.randint(1, 81, (8,), generator=generator),
                        masks=masks))
    return out


def worker(task: str, name: str, repeats: int) -> None:
    torch.manual_seed(0)
    model = detector(name, task)
    batch, height, width = TASKS[task]
    images = [torch.rand(3, height, width) for _ in range(batch)]
    if task == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                model(images)
    else:
        model.train()
        labels = targets(batch, height, width)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=1e-4, fused=True)

        def step():
            optimizer.zero_grad(set_to_none=True)
            sum(model(images, labels).values()).backward()
            optimizer.step()
    result = measure(step, repeats)
    if task == "inference":  # the backbone's multiply-adds at this size, for the reader
        body = model.backbone.body
        result["backbone_macs"] = _body_macs(body, height, width)
    worker_output(result)


def _body_macs(body, height: int, width: int) -> float:
    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return list(self.body(x).values())[-1]
    return multiply_adds(Features(), (height, width))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.repeats)
    runs = [(task, name) for task in TASKS for name in MODELS]
    best = {}
    for round_number in range(args.rounds):
        for run in runs:
            result = run_isolated(Path(__file__), [*run, "--repeats", str(args.repeats)])
            print(f"round {round_number + 1}/{args.rounds} {run}: {result['time_s']:.2f} s, "
                  f"{result['peak_mib']:.0f} MiB", flush=True)
            previous = best.get(run, result)
            best[run] = dict(result, time_s=min(previous["time_s"], result["time_s"]),
                             peak_mib=min(previous["peak_mib"], result["peak_mib"]))
    rows = []
    for task, (batch, height, width) in TASKS.items():
        peer = best[(task, PEER)]
        for name in MODELS:
            result = best[(task, name)]
            macs = best[("inference", name)]["backbone_macs"]  # at 800x1216
            rows.append([f"{task} ({batch} x {height}x{width})", name,
                         f"{macs / 1e9:.1f}", f"{result['time_s'] * 1000:.0f}",
                         f"{result['time_s'] / peer['time_s']:.2f}x", f"{result['peak_mib']:.0f}",
                         f"{result['peak_mib'] / peer['peak_mib']:.2f}x"])
    table = markdown_table(["task", "backbone", "backbone GMACs at 800x1216", "ms",
                            "time vs resnet50", "peak MiB", "memory vs resnet50"], rows)
    command = "python experiments/benchmark_detection.py " + " ".join(sys.argv[1:])
    body = (f"Command: `{command.strip()}` ({environment()}; untrained weights, 81 classes; "
            f"best of {args.rounds} interleaved rounds x {args.repeats} steps, each in a fresh "
            "process). attentionvig_s: `attentionvig_fpn_backbone` defaults, the paper's "
            "fine-tuning (every stage trainable, BatchNorm statistics fixed, beta frozen); "
            "attentionvig_s-tv: torchvision's recipe for its resnet50 (3 trainable stages, frozen "
            "BatchNorm); resnet50: torchvision's `maskrcnn_resnet50_fpn`. Same Mask R-CNN heads and "
            "FPN (256 channels); each detector's transform resizes to the task's input size. "
            "Training: RPN, box and mask losses of 8 boxes per image, backward, AdamW step "
            "(fused kernel). "
            "Every process with the training programs' allocator setting "
            "(experiments/allocator.py). Memory: peak RSS of one step minus the RSS before it."
            "\n\n"
            + table)
    update_section("Mask R-CNN: AttentionViG-S FPN against resnet50-FPN", body)
    print(table)


if __name__ == "__main__":
    main()
