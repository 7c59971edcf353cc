"""Where a timm model's CPU time and training memory go: the torch profiler's operator table for
one step (training at batch 8, or inference at batch 16, optionally BatchNorm-fused), and the
activations autograd keeps for backward during a training forward pass, by stage (distinct
storages, parameters excluded). What docs/benchmarks.md's profile section quotes. The process
runs with glibc's malloc set as the training programs and benchmarks set it (allocator.py).

    python experiments/profile_backbone.py attentionvig_s --mode train [--rows 15]
    python experiments/profile_backbone.py attentionvig_s --mode train --compile
    python experiments/profile_backbone.py attentionvig_s --mode train --shapes
    python experiments/profile_backbone.py attentionvig_s --mode fused
    python experiments/profile_backbone.py attentionvig_s --mode saved
    python experiments/profile_backbone.py attentionvig_s --mode train --device cuda --amp
"""
import argparse
from collections import Counter

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import allocator
import attvig_pyg.models  # noqa: F401  (registers the models with timm)


def operator_table(model: torch.nn.Module, mode: str, rows: int, compiled: bool,
                   shapes: bool, device: str = "cpu", amp: bool = False) -> str:
    on_gpu = torch.device(device).type == "cuda"
    batch = (64 if mode == "train" else 128) if on_gpu else (8 if mode == "train" else 16)
    model.to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp)
    model.train(mode == "train")
    if mode == "fused":
        model.reparameterize()
    forward = torch.compile(model) if compiled else model
    if mode == "train":
        labels = torch.randint(0, 1000, (images.size(0),), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)  # as the engine

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(forward(images), labels)
            loss.backward()
            optimizer.step()
    else:
        def step():
            with torch.no_grad(), autocast:
                forward(images)
    step()  # warm-up (and the compilation)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=shapes) as profiler:
        step()
        if on_gpu:
            torch.cuda.synchronize()
    return profiler.key_averages(group_by_input_shape=shapes).table(
        sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=rows,
        max_shapes_column_width=60)


def saved_activations(model: torch.nn.Module) -> Counter:
    """MiB kept for backward per top-level part (stem, stages.i, head), batch 8, 224 px."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, where = {}, ["?"]

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in parameters and key not in storages:
            storages[key] = (tensor.untyped_storage().nbytes(), where[0])
        return tensor

    def enter(name):
        def hook(module, inputs):
            where[0] = name
        return hook
    hooks = [module.register_forward_pre_hook(enter(".".join(name.split(".")[:2])))
             for name, module in model.named_modules() if name and not list(module.children())]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.train()(torch.randn(8, 3, 224, 224))
    finally:
        for hook in hooks:
            hook.remove()
    by_part = Counter()
    for nbytes, name in storages.values():
        by_part[name if name.startswith("stages") else name.split(".")[0]] += nbytes / 2 ** 20
    return by_part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a timm model name")
    parser.add_argument("--mode", choices=["train", "eval", "fused", "saved"], default="train")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--compile", action="store_true",
                        help="profile the torch.compile'd model (train, eval, fused)")
    parser.add_argument("--shapes", action="store_true",
                        help="one row per operator and input shapes")
    parser.add_argument("--keep-activations", action="store_true",
                        help="AttentionViG without its activation recomputation")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (train, eval, fused: batch 64 / 128 on a GPU)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    allocator.apply(allocator.FAST)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=1000)
    if args.keep_activations:
        model.set_activation_recompute(False)
    if args.mode != "saved":
        print(operator_table(model, args.mode, args.rows, args.compile, args.shapes,
                             args.device, args.amp))
        return
    by_part = saved_activations(model)
    print(f"{args.model}: {sum(by_part.values()):.0f} MiB of activations kept for backward "
          "(batch 8, 224 px)")
    for part, mib in sorted(by_part.items()):
        print(f"  {part:12s} {mib:7.1f}")


if __name__ == "__main__":
    main()
