"""CrossAttnConv on general graphs: graph classification of Fashion-MNIST superpixel graphs with
one architecture and the conv chosen by name, as "Benchmarking Graph Neural Networks" (Dwivedi
et al.) compares convs on MNIST superpixels.

    python experiments/superpixels.py --profile cpu                  # every conv, 2 seeds, 2 cores
    python experiments/superpixels.py --convs cross_attn gatv2 --seeds 0 1 2 --epochs 100
    python experiments/superpixels.py --run --conv gcn --output runs/gcn  # one run, engine flags

Every (conv, seed) is one run of the training engine in OUTPUT/<conv>/seed<seed> (resumable:
repeat the command; finished runs are skipped), evaluated on the validation graphs each epoch;
the best epoch's weights are then scored on the test graphs. The table (test accuracy mean and
std, parameters, seconds per epoch, and the time and peak memory of one training step, each conv
measured in a fresh process on the same batch of real graphs) goes to OUTPUT/superpixels.md and
.csv, the curves to OUTPUT/superpixels.png. Reading and results: docs/general-graphs.md.
"""
import argparse
import csv
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import (GATv2Conv, GCNConv, GINConv, ResGatedGraphConv, TransformerConv,
                                global_mean_pool)

import engine
from attvig_pyg import CrossAttnConv
from attvig_pyg.data.fashion_mnist import load_fashion_mnist
from attvig_pyg.data.superpixels import FashionMNISTSuperpixels, superpixel_graph
from benchmarking import markdown_table, measure, run_isolated, worker_output

PROGRAM = "superpixels"
log = logging.getLogger("superpixels")

HEADS = 8
# name -> (takes edge features, the layer for a width)
CONVS = {
    "cross_attn": (False, lambda width: CrossAttnConv(width, width, heads=HEADS)),
    "cross_attn_edges": (True, lambda width: CrossAttnConv(width, width, heads=HEADS, edge_dim=1)),
    "gatv2": (False, lambda width: GATv2Conv(width, width // HEADS, heads=HEADS)),
    "transformer": (False, lambda width: TransformerConv(width, width // HEADS, heads=HEADS)),
    "gin": (False, lambda width: GINConv(nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                                       nn.Linear(width, width)))),
    "gcn": (False, lambda width: GCNConv(width, width)),
    "gated": (False, lambda width: ResGatedGraphConv(width, width)),
}
# Dwivedi et al.'s budget: about 100k parameters, 4 layers.
PARAMETERS, LAYERS, FEATURES, CLASSES = 100_000, 4, 3, 10
# The CPU profile: 2 seeds of every conv in at most 90 minutes on 2 cores (docs/general-graphs.md
# states what it costs): the embedded images' 9,000 training graphs, 1,000 validation graphs,
# the complete 10,000 test graphs.
PROFILES = {"cpu": dict(epochs=10, patience=2, batch_size=128, workers=0, full=False)}


class SuperpixelGNN(nn.Module):
    """Dwivedi et al.'s graph classifier: a linear embedding, ``LAYERS`` residual blocks of conv
    + batch norm + ReLU (+ dropout), mean readout and a three-layer MLP."""

    def __init__(self, conv: str, width: int, dropout: float = 0.0):
        super().__init__()
        self.edges, make = CONVS[conv]
        self.embed = nn.Linear(FEATURES, width)
        self.convs = nn.ModuleList(make(width) for _ in range(LAYERS))
        self.norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(LAYERS))
        self.dropout = dropout
        self.readout = nn.Sequential(nn.Linear(width, width // 2), nn.ReLU(),
                                     nn.Linear(width // 2, width // 4), nn.ReLU(),
                                     nn.Linear(width // 4, CLASSES))

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.embed(batch.x)
        for conv, norm in zip(self.convs, self.norms):
            out = conv(h, batch.edge_index, batch.edge_attr) if self.edges else \
                conv(h, batch.edge_index)
            h = h + F.dropout(F.relu(norm(out)), self.dropout, self.training)
        return self.readout(global_mean_pool(h, batch.batch))


def width_for(conv: str) -> int:
    """The width (a multiple of the heads) whose model has the parameter count nearest to
    ``PARAMETERS``."""
    def count(width: int) -> int:
        return sum(p.numel() for p in SuperpixelGNN(conv, width).parameters())
    return min(range(HEADS, 257, HEADS), key=lambda width: abs(count(width) - PARAMETERS))


class PlateauSchedule:
    """Dwivedi et al.'s schedule, the rate halved when the validation accuracy stops improving:
    torch's ReduceLROnPlateau behind the scheduler interface the engine calls. (timm's
    PlateauLRScheduler is deprecated and keeps its counters out of checkpoints, so that a
    resumed run would halve its rate later than the uninterrupted one.)"""

    def __init__(self, optimizer, patience: int, min_lr: float):
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.5, patience=patience, min_lr=min_lr)

    def step(self, epoch: int, metric: Optional[float] = None) -> None:
        self.plateau.step(metric)

    def step_update(self, num_updates: int, metric: Optional[float] = None) -> None:
        pass  # the rate changes between epochs only

    def state_dict(self) -> Dict:
        return self.plateau.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.plateau.load_state_dict(state)


# ---- one run --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="One run: graph classification of Fashion-MNIST superpixel graphs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data and model")
    group.add_argument("--full", action="store_true",
                       help="the Debian package's 60,000 training images (55,000 / 5,000 graphs) "
                            "instead of the embedded 10,000 (9,000 / 1,000); test: 10,000")
    group.add_argument("--data-root", type=Path, default=None,
                       help="graph cache (default: $ATTVIG_DATA/superpixels)")
    group.add_argument("--conv", choices=sorted(CONVS), default="cross_attn")
    group.add_argument("--dropout", type=float, default=0.0)
    group = engine.add_training_arguments(parser, epochs=100, batch_size=128, weight_decay=0.0)
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--patience", type=int, default=10,
                       help="epochs without a better validation accuracy before the rate halves")
    group.add_argument("--min-lr", type=float, default=1e-5)
    # Dwivedi et al.: Adam, no weight decay. (No pretrained weights, no image-grid graph.)
    parser.set_defaults(opt="adam", workers=0, pretrained=None, graph=None, aggregator=None)
    engine.add_run_arguments(parser, {})
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = engine.parse_args(build_parser, argv, {}, _problems)
    args.model = f"superpixel_gnn_{args.conv}"  # what the engine names runs and logs by
    return args


def _problems(args):
    if args.patience < 1:
        yield f"--patience must be positive (got {args.patience})"


def collate(graphs):
    return Batch.from_data_list(graphs), 0


class GraphClassification(engine.ModelTask):
    """Cross-entropy of the graph label; evaluated by accuracy (and loss)."""

    score = "accuracy"

    def loss(self, batch, device):
        graphs = batch[0].to(device)
        return F.cross_entropy(self.trained(graphs), graphs.y), graphs.num_graphs

    @torch.no_grad()
    def evaluate(self, model, loader, world, args) -> Dict[str, float]:
        model.eval()
        correct = loss = count = 0.0
        for graphs, _ in engine.batches(loader):
            graphs = graphs.to(world.device)
            logits = model(graphs)
            correct += (logits.argmax(dim=1) == graphs.y).sum().item()
            loss += F.cross_entropy(logits, graphs.y, reduction="sum").item()
            count += graphs.num_graphs
        correct, loss, count = world.sum(correct, loss, count)
        return dict(accuracy=100 * correct / count, loss=loss / count, graphs=count)


def dataset(args, split: str) -> FashionMNISTSuperpixels:
    return FashionMNISTSuperpixels(args.data_root, split, full=args.full)


def build_model(args) -> SuperpixelGNN:
    return SuperpixelGNN(args.conv, width_for(args.conv), args.dropout)


def build_run(args, world) -> engine.Setup:
    train_set, val_set = dataset(args, "train"), dataset(args, "val")
    model = build_model(args)
    log.info("%s: width %d, %d parameters, %d training and %d validation graphs", args.conv,
             model.embed.out_features, sum(p.numel() for p in model.parameters()),
             len(train_set), len(val_set))

    def schedule(optimizer, updates_per_epoch: int):
        return PlateauSchedule(optimizer, args.patience, args.min_lr)
    return engine.Setup(model=model, task=GraphClassification(model), train_set=train_set,
                        eval_set=val_set, collate=collate, lr=args.lr, schedule=schedule,
                        info=dict(train_graphs=len(train_set), val_graphs=len(val_set),
                                  full=args.full))


def build_evaluation(args, world, info: Optional[Dict]):
    if info is None:
        raise SystemExit(f"--eval-only takes a checkpoint of experiments/{PROGRAM}.py")
    model = build_model(args)
    return model, GraphClassification(model), dataset(args, "test"), collate


def describe(metrics: Dict[str, float]) -> str:
    return f"accuracy {metrics['accuracy']:.2f}% on {int(metrics['graphs'])} graphs"


def test_checkpoint(folder: Path) -> Dict:
    """The best epoch's weights of a finished run on the test graphs (OUTPUT/test.json)."""
    if (folder / "test.json").exists():
        return json.loads((folder / "test.json").read_text())
    metrics = engine.main(PROGRAM, parse_args(["--eval-only", "--checkpoint",
                                               str(folder / "best.pth")]),
                          build_run, build_evaluation, describe, "the test graphs")
    result = dict(test_accuracy=metrics["accuracy"], test_graphs=metrics["graphs"])
    with engine.atomic_file(folder / "test.json") as temporary:
        temporary.write_text(json.dumps(result, indent=2))
    return result


def step_cost(conv: str, batch_size: int, repeats: int = 5) -> Dict[str, float]:
    """One training step (forward, backward, Adam) on the superpixel graphs of the first
    ``batch_size`` embedded training images, measured by benchmarking.measure: the best of
    ``repeats`` times, and the peak memory it added. Run in a fresh process (worker mode) so
    that no conv measured earlier leaves memory the allocator keeps."""
    images, labels = load_fashion_mnist("train")
    graphs = []
    for image, label in zip(images[:batch_size], labels[:batch_size]):
        graphs.append(superpixel_graph(image.numpy()))
        graphs[-1].y = label.view(1)
    graphs = Batch.from_data_list(graphs)
    torch.manual_seed(0)
    model = SuperpixelGNN(conv, width_for(conv)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(graphs), graphs.y).backward()
        optimizer.step()
    return measure(step, repeats)


# ---- the table --------------------------------------------------------------------------------

def build_table_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options not listed here go to every run (see --run --help).", allow_abbrev=False)
    parser.add_argument("--run", action="store_true", help="one run with the flags that follow")
    parser.add_argument("--convs", nargs="+", choices=list(CONVS), default=list(CONVS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items())
                                       for name, p in PROFILES.items()))
    parser.add_argument("--output", type=Path, default=Path("runs/superpixels"))
    return parser


def profile_argv(profile: Optional[str]) -> List[str]:
    argv = []
    for key, value in (PROFILES[profile] if profile else {}).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv


def train_table(table, run_argv: List[str]) -> List[Dict]:
    plan = [(conv, seed) for conv in table.convs for seed in table.seeds]
    results = []
    for index, (conv, seed) in enumerate(plan, 1):
        folder = table.output / conv / f"seed{seed}"
        argv = [*profile_argv(table.profile), "--conv", conv, "--seed", str(seed), *run_argv]
        run_args = engine.series_run(folder, argv, parse_args)
        if run_args is not None:
            log.info("run %d/%d: %s seed %d%s", index, len(plan), conv, seed,
                     " (resumed)" if run_args.resume else "")
            engine.train(PROGRAM, run_args, build_run)
        else:
            log.info("run %d/%d: %s seed %d already finished (%s)", index, len(plan), conv, seed,
                     folder)
        summary = json.loads((folder / "results.json").read_text())
        test = test_checkpoint(folder)
        results.append(dict(conv=conv, seed=seed, summary=summary, **test))
    return results


def write_report(table, results: List[Dict], batch_size: int) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, entries = [], []
    for conv in table.convs:
        runs = [r for r in results if r["conv"] == conv]
        accuracies = [r["test_accuracy"] for r in runs]
        epoch_seconds = [row["train"]["seconds"] for r in runs
                         for row in torch.load(table.output / conv / f"seed{r['seed']}" /
                                               "last.pth", map_location="cpu",
                                               weights_only=True)["history"]]
        log.info("measuring one training step of %s (batch %d, fresh process)", conv, batch_size)
        cost = run_isolated(Path(__file__), [conv, str(batch_size)])
        entry = dict(conv=conv, runs=len(runs), mean=statistics.mean(accuracies),
                     std=statistics.stdev(accuracies) if len(accuracies) > 1 else math.nan,
                     per_seed=accuracies,
                     parameters=sum(p.numel() for p in
                                    SuperpixelGNN(conv, width_for(conv)).parameters()),
                     seconds_per_epoch=statistics.mean(epoch_seconds),
                     step_ms=1000 * cost["time_s"], step_peak_mib=cost["peak_mib"],
                     epochs=runs[0]["summary"]["epochs"])
        entries.append(entry)
    reference = {e["conv"]: e["step_ms"] for e in entries}
    header = ["conv", "test accuracy (%) mean ± std", "per seed", "parameters", "s per epoch",
              f"step ms (batch {batch_size})", "vs gatv2", "vs transformer", "step peak MiB"]
    for e in entries:
        rows.append([e["conv"], f"{e['mean']:.2f} ± {e['std']:.2f}",
                     ", ".join(f"{v:.2f}" for v in e["per_seed"]), f"{e['parameters']:,}",
                     f"{e['seconds_per_epoch']:.1f}", f"{e['step_ms']:.0f}",
                     *(f"{e['step_ms'] / reference[peer]:.2f}x" if peer in reference
                       else "-" for peer in ("gatv2", "transformer")),
                     f"{e['step_peak_mib']:.0f}"])
    text = markdown_table(header, rows) + "\n"
    with engine.atomic_file(table.output / "superpixels.md") as temporary:
        temporary.write_text(text)
    with engine.atomic_file(table.output / "superpixels.csv") as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[k for k in entries[0] if k != "per_seed"])
            writer.writeheader()
            writer.writerows({k: v for k, v in e.items() if k != "per_seed"} for e in entries)

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.get_cmap("tab10")
    for index, conv in enumerate(table.convs):
        for r in (r for r in results if r["conv"] == conv):
            history = torch.load(table.output / conv / f"seed{r['seed']}" / "last.pth",
                                 map_location="cpu", weights_only=True)["history"]
            epochs = [row["epoch"] for row in history]
            label = conv if r["seed"] == table.seeds[0] else None
            loss_axis.plot(epochs, [row["train"]["loss"] for row in history],
                           color=colours(index), label=label)
            accuracy_axis.plot(epochs, [row["eval"]["accuracy"] for row in history],
                               color=colours(index), label=label)
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="training loss (every seed)")
    accuracy_axis.set(xlabel="epoch", ylabel="validation accuracy (%)",
                      title="validation accuracy (every seed)")
    accuracy_axis.legend(fontsize=8)
    figure.tight_layout()
    with engine.atomic_file(table.output / "superpixels.png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    return text


def main(argv: Optional[List[str]] = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # step_cost in a fresh process: --worker CONV BATCH_SIZE
        return worker_output(step_cost(argv[1], int(argv[2])))
    if "--run" in argv:  # one run: every other flag is the run's
        argv.remove("--run")
        args = parse_args(argv)
        return engine.main(PROGRAM, args, build_run, build_evaluation, describe,
                           "the test graphs" if args.eval_only else "the validation graphs")
    table, run_argv = build_table_parser().parse_known_args(argv)
    for flag in ("--conv", "--seed", "--output", "--resume"):
        if any(option.split("=")[0] == flag for option in run_argv):
            raise SystemExit(f"{flag} is set per run by the table; use --convs, --seeds, "
                             f"--output (or --run for one run)")
    # A bad run option fails now, not after an hour.
    batch_size = parse_args([*profile_argv(table.profile), *run_argv]).batch_size
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.time()
    results = train_table(table, run_argv)
    text = write_report(table, results, batch_size)
    print(text, end="")
    print(f"{len(results)} runs in {table.output}; this command's wall time "
          f"{(time.time() - started) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
