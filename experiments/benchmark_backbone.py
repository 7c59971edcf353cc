"""AttentionViG-S/M/B against timm's resnet50 (also in channels_last), efficientformerv2_s2 and
fastvit_sa12 on the CPU (--part models): parameters, multiply-adds, inference throughput (batch 16,
224 px; eager, BatchNorm-fused, compiled), training-step throughput and peak memory (batch 8;
eager, compiled, without activation recomputation, with gradient checkpointing), and GreedyViG-S's
computation on the same skeleton; and AttentionViG-S's cost against input size (--part scaling;
batch 1, from 224 px to detection sizes), whole and as a feature extractor beside resnet50's.
Every measurement runs in a fresh process; the runs are interleaved and the best of the rounds is
kept. Results go to docs/benchmarks.md.

--part runtimes measures inference where people deploy it: AttentionViG-S/M/B and the peers
(resnet50, efficientformerv2_s2, fastvit_sa12) in eager PyTorch, torch.compile with freezing and
ONNX Runtime (attvig_pyg.models.deployment.inference_model, BatchNorm folded everywhere):
throughput at batch 16 and batch-1 latency (median and p90 of 100 runs), with ONNX Runtime's
profile by op type, the training step of AttentionViG-S and resnet50 eager and compiled, and
the multiply-add rate of a 1x1 conv, the layers that carry most of these models' work.

--part against DIR times AttentionViG-S and GreedyViG-S with this checkout's library and with
the one in DIR (another commit's checkout: `git worktree add DIR COMMIT`), interleaved: what a
change to the library costs. --device cuda times the models on a GPU (bf16 autocast,
channels_last, eager and compiled) against resnet50 on the same GPU.

    python experiments/benchmark_backbone.py [--part models|scaling|all] [--rounds 3]
    python experiments/benchmark_backbone.py --part runtimes --rounds 2
    python experiments/benchmark_backbone.py --part against /tmp/base --rounds 3
    python experiments/benchmark_backbone.py --device cuda
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import torch

import allocator
from benchmarking import (check_device, environment, markdown_table, measure, multiply_adds,
                          run_isolated, update_section, worker_output)

# Variants: a timm model name, then options joined with "+": "fused" (BatchNorm folded for
# inference: reparameterize() / timm's reparameterize_model), "compiled" (torch.compile; its
# first step is timed apart), "channels_last" (model and input), "keep_activations" (AttentionViG
# without its activation recomputation), "maxrel_dagc" (AttentionViG's skeleton with GreedyViG's
# max-relative Grapher on DAGC graphs), "default_malloc" (the process with glibc's default
# allocator instead of allocator.FAST).
INFERENCE = ["resnet50", "resnet50+channels_last", "resnet50+default_malloc",
             "efficientformerv2_s2", "fastvit_sa12+fused", "attentionvig_s",
             "attentionvig_s+fused", "attentionvig_s+fused+default_malloc",
             "attentionvig_s+fused+compiled", "attentionvig_s+maxrel_dagc+fused",
             "attentionvig_m+fused", "attentionvig_b+fused"]
TRAIN = ["resnet50", "resnet50+channels_last", "resnet50+default_malloc", "efficientformerv2_s2",
         "fastvit_sa12", "attentionvig_s", "attentionvig_s+default_malloc",
         "attentionvig_s+keep_activations", "attentionvig_s+compiled",
         "attentionvig_s+maxrel_dagc", "attentionvig_m", "attentionvig_b"]
PEER = "resnet50"
# Classification sizes, then the detection and segmentation inputs (Mask R-CNN 800x1216 and
# 1333x800, Semantic FPN 512x512), height x width.
RESOLUTIONS = ["224x224", "320x320", "448x448", "512x512", "640x640", "800x1216", "1333x800"]
INFERENCE_BATCH, TRAIN_BATCH = 16, 8
# The A/B of two checkouts of the library.
AGAINST = [("inference", "attentionvig_s+fused"), ("inference", "greedyvig_s+fused"),
           ("train", "attentionvig_s"), ("train", "greedyvig_s")]
# On a GPU: bf16 autocast ("amp") and channels_last everywhere, larger batches.
GPU_INFERENCE = ["resnet50+channels_last+amp", "resnet50+channels_last+amp+compiled",
                 "attentionvig_s+fused+channels_last+amp",
                 "attentionvig_s+fused+channels_last+amp+compiled",
                 "attentionvig_m+fused+channels_last+amp", "attentionvig_b+fused+channels_last+amp",
                 "greedyvig_s+fused+channels_last+amp"]
GPU_TRAIN = ["resnet50+channels_last+amp", "resnet50+channels_last+amp+compiled",
             "attentionvig_s+channels_last+amp", "attentionvig_s+channels_last+amp+compiled",
             "attentionvig_s+channels_last+amp+keep_activations",
             "attentionvig_m+channels_last+amp", "attentionvig_b+channels_last+amp",
             "greedyvig_s+channels_last+amp"]
GPU_PEER = "resnet50+channels_last+amp"
GPU_INFERENCE_BATCH, GPU_TRAIN_BATCH = 128, 64
# --part runtimes: where a trained model is deployed.
RUNTIME_MODELS = ["resnet50", "efficientformerv2_s2", "fastvit_sa12", "attentionvig_s",
                  "attentionvig_m", "attentionvig_b"]
RUNTIME_TRAIN = ["resnet50", "resnet50+compiled", "attentionvig_s", "attentionvig_s+compiled"]
RUNTIME_PROFILED = ["attentionvig_s", "efficientformerv2_s2"]
LATENCY_RUNS = 100
# A 1x1 conv of AttentionViG's third stage at batch 16 (192 -> 768 channels on 14x14 maps,
# channels-last): the multiply-add rate of the layers that dominate these models.
RATE_CONV = (16 * 14 * 14, 192, 768)


def create(variant: str, features_only: bool = False) -> torch.nn.Module:
    import timm
    from timm.utils.model import reparameterize_model

    import attvig_pyg.models  # noqa: F401  (registers the models with timm)
    name, *options = variant.split("+")
    kwargs = dict(aggregator="max_relative", graph="dagc") if "maxrel_dagc" in options else {}
    if features_only:
        return timm.create_model(name, features_only=True, **kwargs)
    model = timm.create_model(name, num_classes=1000, **kwargs)
    if "keep_activations" in options:
        model.set_activation_recompute(False)
    if "fused" in options:  # ours cannot go through timm's walker (attvig_pyg.models.fusion)
        model = model.reparameterize() if name.startswith(("attentionvig", "greedyvig")) else \
            reparameterize_model(model.eval())
    if "channels_last" in options:
        model = model.to(memory_format=torch.channels_last)
    return model


def parse_size(text: str):
    height, width = map(int, text.split("x"))
    return height, width


def worker(task: str, variant: str, size: str, repeats: int, device: str = "cpu") -> None:
    torch.manual_seed(0)
    options = variant.split("+")[1:]
    height, width = parse_size(size)
    model = create(variant, features_only=task == "features").to(device)
    training = task.startswith("train")
    model.train(training)
    if training and task == "train_checkpointed":
        model.set_grad_checkpointing(True)
    on_gpu = torch.device(device).type == "cuda"
    batch = ((GPU_TRAIN_BATCH if on_gpu else TRAIN_BATCH) if training else
             (GPU_INFERENCE_BATCH if on_gpu else INFERENCE_BATCH) if task == "inference" else 1)
    images = torch.randn(batch, 3, height, width, device=device)
    if "channels_last" in options:
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if "compiled" in options else model
    # bf16 autocast on the GPU ("amp"); no GradScaler: bf16 has float32's range.
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled="amp" in options)
    if training:
        labels = torch.randint(0, 1000, (batch,), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

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
    first = {}
    if "compiled" in options:  # the compilation: a cold cache, timed apart from the steps
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
        started = time.perf_counter()
        step()
        first["first_step_s"] = time.perf_counter() - started
    result = dict(measure(step, repeats, device), **first)
    result["images_per_s"] = batch / result["time_s"]
    if task == "scaling":
        result["macs"] = multiply_adds(model, (height, width))
    worker_output(result)


def runtime_worker(name: str, runtime: str, repeats: int) -> None:
    """Batch-16 throughput and batch-1 latency of ``name`` in ``runtime``, in this process;
    for ONNX Runtime also its profile by op type (another session on the same file)."""
    from attvig_pyg.models.deployment import inference_model
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="runtime-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor")  # a cold cache
    onnx_path = os.path.join(folder, "model.onnx")
    started = time.perf_counter()
    model = inference_model(create(name), runtime, (3, 224, 224), onnx_path=onnx_path)
    batch = torch.randn(INFERENCE_BATCH, 3, 224, 224)
    single = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(batch)  # compiles (torch.compile) or warms up
        result = {"prepare_s": time.perf_counter() - started}
        result.update(measure(lambda: model(batch), repeats))
        result["images_per_s"] = INFERENCE_BATCH / result["time_s"]
        for _ in range(5):  # (torch.compile: the batch-1 graph)
            model(single)
        latencies = []
        for _ in range(LATENCY_RUNS):
            start = time.perf_counter()
            model(single)
            latencies.append(time.perf_counter() - start)
    result["latency_ms"] = 1000 * statistics.median(latencies)
    result["latency_p90_ms"] = 1000 * statistics.quantiles(latencies, n=10)[-1]
    if runtime == "onnxruntime" and name in RUNTIME_PROFILED:
        result["ops"] = onnxruntime_profile(onnx_path, batch)
    worker_output(result)


def onnxruntime_profile(path: str, batch: torch.Tensor) -> Dict[str, float]:
    """Share of ONNX Runtime's kernel time per op type over two runs of ``batch`` (the first
    one's included), and the nodes it runs per run (``nodes_per_run``)."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch.numpy()}
    session.run(None, feed)
    times, calls = {}, 0
    session.run(None, feed)
    with open(session.end_profiling()) as file:
        events = json.load(file)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            times[op] = times.get(op, 0) + event["dur"]
            calls += 1
    total = sum(times.values())
    shares = {op: spent / total for op, spent in sorted(times.items(), key=lambda kv: -kv[1])}
    return dict(shares, nodes_per_run=calls / 2)


def conv_rate_worker(repeats: int) -> None:
    """The time of the 1x1 conv ``RATE_CONV`` (its multiply-adds: the product of the three)."""
    rows, inner, columns = RATE_CONV
    conv = torch.nn.Conv2d(inner, columns, 1).to(memory_format=torch.channels_last)
    x = torch.randn(16, inner, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        result = measure(lambda: conv(x), max(repeats, 20))
    result["images_per_s"] = 0.0  # (what measure_all prints)
    worker_output(result)


def base(variant: str) -> str:
    """The network a variant computes (what its parameters and multiply-adds are counted on)."""
    name, *options = variant.split("+")
    return "+".join([name, *(["maxrel_dagc"] if "maxrel_dagc" in options else [])])


def measure_all(runs, rounds: int, repeats: int, device: str = "cpu",
                against: Optional[Path] = None) -> Dict:
    """Each run in a fresh process, the runs interleaved, ``rounds`` times: the best time and the
    smallest memory (and compilation) of each. Training runs on the CPU also run once more for
    the memory alive at the peak (``live_mib``, benchmarking.py). A run may end in "against":
    it then imports the library of the checkout ``against``."""
    best = {}
    for round_number in range(rounds):
        for run in runs:
            malloc = {} if "default_malloc" in run[1].split("+") else allocator.FAST
            library = against if run[-1] == "against" else None
            result = run_isolated(Path(__file__), [*run[:3], "--repeats", str(repeats),
                                                   "--device", device], malloc, library)
            if run[0] == "train" and device == "cpu" and library is None:
                result["live_mib"] = run_isolated(Path(__file__), [*run, "--repeats", "1"],
                                                  allocator.LIVE)["peak_mib"]
            print(f"round {round_number + 1}/{rounds} {run}: {result['images_per_s']:.1f} img/s, "
                  f"{result['peak_mib']:.0f} MiB, live {result.get('live_mib', 0):.0f} MiB",
                  flush=True)
            previous = best.get(run, result)
            best[run] = dict(result, **{key: min(previous[key], result[key])
                                        for key in ("time_s", "peak_mib", "live_mib",
                                                    "first_step_s", "prepare_s", "latency_ms",
                                                    "latency_p90_ms")
                                        if key in result})
            best[run]["images_per_s"] = max(previous["images_per_s"], result["images_per_s"])
    return best


def models_section(best: Dict, args) -> str:
    sizes = {}
    for variant in {base(v) for v in INFERENCE + TRAIN}:
        model = create(variant)
        sizes[variant] = (sum(p.numel() for p in model.parameters()), multiply_adds(model, 224))

    def compiled(result):
        return f"{result['first_step_s']:.0f}" if "first_step_s" in result else ""

    def speed(result, peer, variant):  # throughput, and multiply-adds per second, vs the peer
        ratio = result["images_per_s"] / peer["images_per_s"]
        return [f"{result['images_per_s']:.1f}", f"{ratio:.2f}x",
                f"{ratio * sizes[base(variant)][1] / sizes[PEER][1]:.2f}x"]

    peer = best[("inference", PEER, "224x224")]
    inference_rows = []
    for variant in INFERENCE:
        result = best[("inference", variant, "224x224")]
        params, macs = sizes[base(variant)]
        inference_rows.append([variant, f"{params / 1e6:.2f}", f"{macs / 1e9:.2f}",
                               *speed(result, peer, variant), compiled(result)])
    peer = best[("train", PEER, "224x224")]
    train_rows = []
    for variant in TRAIN:
        result = best[("train", variant, "224x224")]
        train_rows.append([variant, f"{sizes[base(variant)][1] / 1e9:.2f}",
                           *speed(result, peer, variant),
                           f"{result['peak_mib']:.0f}",
                           f"{result['peak_mib'] / peer['peak_mib']:.2f}x",
                           f"{result['live_mib']:.0f}",
                           f"{result['live_mib'] / peer['live_mib']:.2f}x", compiled(result)])
    checkpoint_rows = []
    for name in ("attentionvig_s", PEER):
        plain = best[("train", name, "224x224")]
        saved = best[("train_checkpointed", name, "224x224")]
        checkpoint_rows.append([name, f"{plain['peak_mib']:.0f}", f"{saved['peak_mib']:.0f}",
                                f"{plain['images_per_s']:.1f}", f"{saved['images_per_s']:.1f}"])
    command = "python experiments/benchmark_backbone.py " + " ".join(sys.argv[1:])
    return (
        f"Command: `{command.strip()}` ({environment()}; untrained weights; best of "
        f"{args.rounds} interleaved rounds x {args.repeats} steps, every model and task in a "
        "fresh process). Variants: `+fused` BatchNorm folded for inference "
        "(`reparameterize()`, timm's `reparameterize_model` for fastvit), `+compiled` "
        "`torch.compile` (default inductor backend; its first step, the compilation with a cold "
        "cache, is timed apart: 'compile s'), `+channels_last` model and input in that layout "
        "(AttentionViG computes in it anyway), `+keep_activations` AttentionViG without its "
        "activation recomputation, `+maxrel_dagc` AttentionViG's skeleton with GreedyViG-S's "
        "max-relative Grapher on DAGC graphs. MACs: `FlopCounterMode` total / 2, eval, batch 1, "
        "224 px, unfused; 'MACs/s vs resnet50': the throughput ratio times the model's "
        "multiply-adds over resnet50's, the rate at which it gets through its multiply-adds "
        "against resnet50's rate. Training step: forward, cross-entropy, backward, AdamW step "
        "(torch's fused kernel, for every model). Allocator: every process runs with glibc's "
        "malloc set as the training programs set it (experiments/allocator.py: freed memory "
        "kept for reuse instead of being mapped and faulted in anew), except `+default_malloc`, "
        "glibc's defaults. Memory, two ways, each in its own fresh process: 'peak MiB', the "
        "peak RSS of one training step minus the RSS before it (after a warm-up step and "
        "`malloc_trim`), in the timing process; 'live MiB', the same with glibc returning "
        "every freed block larger than 64 KiB at once, so that it is the peak of the memory in "
        "use (benchmarking.py).\n\nInference, batch 16, 224 px:\n\n" + markdown_table(
            ["variant", "params (M)", "MACs (G)", "img/s", "vs resnet50", "MACs/s vs resnet50",
             "compile s"],
            inference_rows) +
        f"\n\nTraining step, batch {TRAIN_BATCH}, 224 px:\n\n" + markdown_table(
            ["variant", "MACs (G)", "img/s", "vs resnet50", "MACs/s vs resnet50", "peak MiB",
             "vs resnet50", "live MiB", "vs resnet50", "compile s"], train_rows) +
        "\n\nGradient checkpointing (timm's `set_grad_checkpointing()`), batch 8:\n\n" +
        markdown_table(["model", "train peak MiB", "with set_grad_checkpointing()", "train img/s",
                        "with set_grad_checkpointing()"], checkpoint_rows))


def scaling_section(best: Dict, args) -> str:
    reference = best[("scaling", "attentionvig_s", "224x224")]
    base_pixels = 224 * 224
    base_ratio = (best[("features", PEER, "224x224")]["images_per_s"] /
                  best[("features", "attentionvig_s", "224x224")]["images_per_s"])
    rows = []
    for size in RESOLUTIONS:
        result = best[("scaling", "attentionvig_s", size)]
        pixels = parse_size(size)[0] * parse_size(size)[1]
        seconds = 1 / result["images_per_s"]
        ratio = (best[("features", PEER, size)]["images_per_s"] /
                 best[("features", "attentionvig_s", size)]["images_per_s"])
        rows.append([
            size, f"{pixels / base_pixels:.2f}x", f"{result['macs'] / 1e9:.2f}",
            f"{result['macs'] / pixels / (reference['macs'] / base_pixels):.3f}x",
            f"{seconds * 1000:.0f}",
            f"{seconds * reference['images_per_s'] * base_pixels / pixels:.2f}x",
            f"{ratio:.2f}x", f"{ratio / base_ratio:.2f}x"])
    command = "python experiments/benchmark_backbone.py " + " ".join(sys.argv[1:])
    return (
        f"Command: `{command.strip()}` ({environment()}; eager, unfused, untrained weights; "
        f"best of {args.rounds} interleaved rounds x {args.repeats} steps, each in a fresh "
        "process, with the training programs' allocator setting, experiments/allocator.py). "
        "Inference, batch 1; MACs include the cross-attention's shifted products "
        "(attvig_pyg.models.complexity.multiply_adds); features: `features_only=True` models, "
        "all four stages, "
        "against timm's resnet50.\n\n" + markdown_table(
            ["input (h x w)", "pixels vs 224", "MACs (G)", "MACs per pixel vs 224",
             "ms per image", "time per pixel vs 224", "features: time vs resnet50",
             "that ratio vs 224's"], rows))


def against_section(best: Dict, args) -> str:
    rows = []
    for task, variant in AGAINST:
        mine, theirs = best[(task, variant, "224x224")], best[(task, variant, "224x224",
                                                                "against")]
        rows.append([task, variant, f"{mine['images_per_s']:.1f}",
                     f"{theirs['images_per_s']:.1f}",
                     f"{mine['images_per_s'] / theirs['images_per_s']:.3f}x",
                     f"{mine['peak_mib']:.0f}", f"{theirs['peak_mib']:.0f}"])
    command = "python experiments/benchmark_backbone.py " + " ".join(sys.argv[1:])
    return (f"Command: `{command.strip()}` ({environment()}; best of {args.rounds} interleaved "
            f"rounds x {args.repeats} steps, every run in a fresh process; inference batch "
            f"{INFERENCE_BATCH}, training step batch {TRAIN_BATCH}, 224 px). 'this': the "
            f"checkout's library; 'other': the library of {args.against_label}.\n\n" +
            markdown_table(["task", "variant", "this img/s", "other img/s", "this vs other",
                            "this peak MiB", "other peak MiB"], rows))


def runtimes_section(best: Dict, args) -> str:
    runtimes = ("eager", "compiled", "onnxruntime")
    macs = {name: multiply_adds(create(name), 224) for name in RUNTIME_MODELS}
    rate = RATE_CONV[0] * RATE_CONV[1] * RATE_CONV[2] / best[("conv_rate", "", "")]["time_s"]
    peer, baseline = "efficientformerv2_s2", "resnet50"
    throughput, latency = [], []
    for name in RUNTIME_MODELS:
        results = [best[("runtime", name, runtime)] for runtime in runtimes]
        def against(result, runtime):
            return (f"{result['images_per_s']:.1f} (" + ", ".join(
                f"{result['images_per_s'] / best[('runtime', other, runtime)]['images_per_s']:.2f}x"
                for other in (peer, baseline)) + ")")
        throughput.append([name, f"{macs[name] / 1e9:.2f}",
                           *[against(r, rt) for r, rt in zip(results, runtimes)],
                           f"{rate / macs[name]:.0f}",
            " / ".join(f"{r['prepare_s']:.0f}" for r in results[1:])])
        latency.append([name, *[f"{r['latency_ms']:.1f} / {r['latency_p90_ms']:.1f}"
                                for r in results],
                        min(runtimes, key=lambda rt: best[("runtime", name, rt)]["latency_ms"])])
    train_rows = []
    reference = best[("train", baseline, "224x224")]
    for variant in RUNTIME_TRAIN:
        result = best[("train", variant, "224x224")]
        eager = best[("train", variant.split("+")[0], "224x224")]
        train_rows.append([variant, f"{result['images_per_s']:.1f}",
                           f"{result['images_per_s'] / reference['images_per_s']:.2f}x",
                           f"{result['images_per_s'] / eager['images_per_s']:.2f}x",
                           f"{result['peak_mib']:.0f}"])
    profiles = []
    for name in RUNTIME_PROFILED:
        ops = dict(best[("runtime", name, "onnxruntime")]["ops"])
        nodes = ops.pop("nodes_per_run")
        top = ", ".join(f"{op} {share * 100:.0f} %" for op, share in list(ops.items())[:8])
        profiles.append(f"- {name} ({nodes:.0f} nodes per run): {top}")
    command = "python experiments/benchmark_backbone.py " + " ".join(sys.argv[1:])
    return (
        f"Command: `{command.strip()}` ({environment()}; untrained weights; every model x "
        f"runtime in a fresh process with the training programs' allocator, best of "
        f"{args.rounds} interleaved rounds). Every model through "
        "`attvig_pyg.models.deployment.inference_model(model, runtime)`: BatchNorm folded "
        "(`reparameterize()`, timm's `reparameterize_model` for the peers), then eager; "
        "`torch.compile` with `freezing`; or exported by torch's dynamo exporter (dynamic "
        "batch, 224 px) and run by ONNX Runtime's CPU provider at `ORT_ENABLE_ALL` with "
        "torch's thread count. MACs: `FlopCounterMode` / 2 per image. 'at conv rate': the "
        "throughput if every multiply-add ran at the rate of a 1x1 conv of AttentionViG's "
        f"third stage ({RATE_CONV[1]} -> {RATE_CONV[2]} channels, 14x14, batch 16, "
        "channels-last: "
        f"{rate / 1e9:.0f} GMAC/s, measured in the same run), the layers that carry most of "
        "these models' multiply-adds.\n\n"
        f"Inference, batch {INFERENCE_BATCH}, 224 px, img/s (vs {peer}, vs {baseline} in the "
        "same runtime):\n\n" + markdown_table(
            ["model", "MACs (G)", "eager", "compiled + frozen", "ONNX Runtime",
             "at conv rate", "compile / export s"], throughput) +
        f"\n\nBatch-1 latency, median / p90 of {LATENCY_RUNS} runs, ms:\n\n" +
        markdown_table(["model", "eager", "compiled + frozen", "ONNX Runtime", "fastest"],
                       latency) +
        f"\n\nTraining step, batch {TRAIN_BATCH}, 224 px (forward, cross-entropy, backward, "
        "fused AdamW):\n\n" + markdown_table(
            ["variant", "img/s", f"vs {baseline} eager", "vs its eager", "peak MiB"],
            train_rows) +
        "\n\nONNX Runtime's profile at batch 16, share of kernel time by op type:\n\n" +
        "\n".join(profiles))


def gpu_section(best: Dict, args) -> str:
    rows = []
    for task, variants in (("inference", GPU_INFERENCE), ("train", GPU_TRAIN)):
        peer = best[(task, GPU_PEER, "224x224")]
        for variant in variants:
            result = best[(task, variant, "224x224")]
            rows.append([task, variant, f"{result['images_per_s']:.0f}",
                         f"{result['images_per_s'] / peer['images_per_s']:.2f}x",
                         f"{result['peak_mib']:.0f}",
                         f"{result['peak_mib'] / peer['peak_mib']:.2f}x",
                         f"{result['first_step_s']:.0f}" if "first_step_s" in result else ""])
    command = "python experiments/benchmark_backbone.py " + " ".join(sys.argv[1:])
    return (f"Command: `{command.strip()}` ({environment()}, {torch.cuda.get_device_name()}; "
            f"best of {args.rounds} interleaved rounds x {args.repeats} steps, every run in a "
            f"fresh process, synchronised around each step; inference batch "
            f"{GPU_INFERENCE_BATCH}, training step batch {GPU_TRAIN_BATCH}, 224 px, bf16 "
            "autocast; memory: peak of torch's CUDA allocator during a step minus before it)."
            "\n\n" + markdown_table(["task", "variant", "img/s", f"vs {GPU_PEER}", "peak MiB",
                                      f"vs {GPU_PEER}", "compile s"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["models", "scaling", "all", "runtimes", "against"],
                        default="all",
                        help="models at 224 px, AttentionViG-S against input size, both, the "
                             "deployment runtimes, or this checkout's library against "
                             "another's (--against)")
    parser.add_argument("--against", type=Path, default=None, metavar="DIR",
                        help="with --part against: the other checkout (its attvig_pyg/)")
    parser.add_argument("--against-label", default=None,
                        help="what the other checkout is, for the page (default: DIR)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (--part models)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("TASK", "MODEL", "SIZE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_device(args.device)
    if args.worker:
        task, name, size = args.worker
        if task == "runtime":
            return runtime_worker(name, size, args.repeats)
        if task == "conv_rate":
            return conv_rate_worker(args.repeats)
        return worker(task, name, size, args.repeats, args.device)
    if args.part == "runtimes":
        runs = [("conv_rate", "", "")]
        runs += [("runtime", name, runtime) for name in RUNTIME_MODELS
                 for runtime in ("eager", "compiled", "onnxruntime")]
        runs += [("train", variant, "224x224") for variant in RUNTIME_TRAIN]
        body = runtimes_section(measure_all(runs, args.rounds, args.repeats), args)
        update_section("Where people deploy it: eager, compiled and frozen, ONNX Runtime", body)
        print(body)
        return
    if args.part == "against":
        if args.against is None or not (args.against / "attvig_pyg").is_dir():
            parser.error("--part against needs --against DIR, a checkout holding attvig_pyg/")
        args.against_label = args.against_label or str(args.against)
        runs = [(task, variant, "224x224", *other) for task, variant in AGAINST
                for other in ((), ("against",))]
        body = against_section(measure_all(runs, args.rounds, args.repeats,
                                           against=args.against), args)
        update_section(f"This checkout against {args.against_label}", body)
        print(body)
        return
    if args.device != "cpu":
        if args.part != "models":
            parser.error("--device cuda measures --part models")
        runs = [(task, variant, "224x224") for task, variants in
                (("inference", GPU_INFERENCE), ("train", GPU_TRAIN)) for variant in variants]
        body = gpu_section(measure_all(runs, args.rounds, args.repeats, args.device), args)
        update_section(f"AttentionViG backbone on {torch.cuda.get_device_name()}", body)
        print(body)
        return

    runs = []
    if args.part in ("models", "all"):
        runs += [("inference", v, "224x224") for v in INFERENCE]
        runs += [("train", v, "224x224") for v in TRAIN]
        runs += [("train_checkpointed", name, "224x224") for name in ("attentionvig_s", PEER)]
    if args.part in ("scaling", "all"):
        runs += [("scaling", "attentionvig_s", size) for size in RESOLUTIONS]
        runs += [("features", name, size) for size in RESOLUTIONS
                 for name in ("attentionvig_s", PEER)]
    best = measure_all(runs, args.rounds, args.repeats)
    if args.part in ("models", "all"):
        body = models_section(best, args)
        update_section("AttentionViG backbone", body)
        print(body)
    if args.part in ("scaling", "all"):
        body = scaling_section(best, args)
        update_section("AttentionViG-S against input size", body)
        print(body)


if __name__ == "__main__":
    main()
