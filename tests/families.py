"""Every model family x graph policy, small enough to run in the default tests, and a float64
record of what each computes (outputs, input and parameter gradients, BatchNorm statistics).

``tests/data/hot_path_reference.pt`` holds the record made at the commit before the hot path
lost its host synchronisations (56a7327); tests/test_devices.py compares with it. To remake it
(only when a change is meant to alter what the models compute):

    .venv/bin/python tests/families.py tests/data/hot_path_reference.pt
"""
import sys
from typing import Callable, Dict, Tuple

import timm
import torch
import torch.nn.functional as F

import attvig_pyg.models  # noqa: F401  (registers the models)

POLICIES = ("svga", "dagc", "knn")
VIG_AGGREGATORS = ("gin", "sage", "edge", "max_relative", "cross_attn")
# AttentionViG / GreedyViG at 64 px: grids 16, 8, 4, 2. The ViG harness at 64 px with stride 8:
# an 8x8 grid.
IMAGE_SIZE = 64
VIG_ARGS = dict(img_size=IMAGE_SIZE, patch_size=8, channels=48, depth=4, head_hidden_size=64)


def families(sizes=("s",)) -> Dict[str, Tuple[Callable[[], torch.nn.Module], int]]:
    """name -> (model factory, image size) for every family x policy (x aggregator)."""
    out = {}
    for size in sizes:
        for graph in POLICIES:
            out[f"attentionvig_{size}-{graph}"] = (
                lambda s=size, g=graph: timm.create_model(f"attentionvig_{s}", num_classes=10,
                                                          graph=g), IMAGE_SIZE)
            out[f"greedyvig_{size}-{graph}"] = (
                lambda s=size, g=graph: timm.create_model(f"greedyvig_{s}", num_classes=10,
                                                          graph=g), IMAGE_SIZE)
    for graph in POLICIES:
        for aggregator in VIG_AGGREGATORS:
            out[f"vig-{aggregator}-{graph}"] = (
                lambda a=aggregator, g=graph: timm.create_model(
                    "vig_ti", num_classes=10, aggregator=a, graph=g, **VIG_ARGS), IMAGE_SIZE)
    return out


def first_output(out):
    """The logits (a distilled model in training returns (cls, dist): their sum)."""
    return out[0] + out[1] if isinstance(out, (tuple, list)) else out


def record(factory: Callable[[], torch.nn.Module], size: int) -> Dict[str, torch.Tensor]:
    """A float64 training step's outputs and gradients (the gradients projected on fixed random
    directions: one number per parameter, 32 for the images), BatchNorm's statistics after it
    and the eval-mode logits."""
    torch.manual_seed(0)
    model = factory().double().train()
    images = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 3])
    logits = first_output(model(images))
    F.cross_entropy(logits, labels).backward()
    directions = torch.Generator().manual_seed(1)
    grads = torch.stack([
        (p.grad * torch.randn(p.shape, generator=directions, dtype=torch.float64)).sum()
        if p.grad is not None else torch.zeros((), dtype=torch.float64)
        for p in model.parameters()])
    buffers = torch.stack([b.double().sum() for b in model.buffers()])
    model.eval()
    with torch.no_grad():
        eval_logits = model(images.detach())
    image_grad = images.grad.flatten() @ torch.randn(images.numel(), 32, generator=directions,
                                                     dtype=torch.float64)
    return dict(logits=logits.detach(), image_grad=image_grad, param_grads=grads,
                buffers=buffers, eval_logits=eval_logits)


if __name__ == "__main__":
    torch.set_num_threads(2)
    reference = {name: record(*case) for name, case in families().items()}
    torch.save(reference, sys.argv[1])
    print(f"wrote {len(reference)} records to {sys.argv[1]}")
