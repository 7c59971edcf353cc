"""Reproduces the paper's ablations: aggregation functions in the vanilla ViG (Table 3), the
attention nonlinearity / neighbour normalisation (Tables 4 and 7) and cross-attention heads
(Table 6) in AttentionViG-S.

    python experiments/ablation.py --table flops                   # params and MACs, no training
    python experiments/ablation.py --table aggregation --profile cpu   # embedded Fashion-MNIST
    python experiments/ablation.py --table aggregation --data-dir /data/imagenet --seeds 0 1 2
    python experiments/ablation.py --table heads --profile cpu --runs no_heads 8_heads

Every run trains with the same recipe and seed set; only the row's setting differs. Run
``<row>`` with seed ``s`` lives in ``OUTPUT/<table>/<row>/seed<s>/`` (an ordinary training run of
experiments/engine.py). A finished run (results.json) is skipped and an interrupted one resumed
from its last.pth, so an interrupted reproduction is continued by repeating its command. The
table (markdown and CSV) and a bar plot are written to ``OUTPUT/<table>.md|csv|png``.

Options not listed by --help go to the training engine (see experiments/imagenet.py --help).
"""
import argparse
import csv
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib
import engine
import imagenet
from benchmarking import markdown_table, multiply_adds

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("ablation")

# Rows of each table: constructor arguments, and the paper's ImageNet-1K top-1 (and FLOPs).
TABLES = {
    "aggregation": dict(model="vig_ti", rows={
        "gin": dict(aggregator="gin"),
        "sage": dict(aggregator="sage"),
        "edge": dict(aggregator="edge"),
        "max_relative": dict(aggregator="max_relative"),
        "cross_attn": dict(aggregator="cross_attn"),
    }, paper_top1={"gin": 72.8, "sage": 74.0, "edge": 74.3, "max_relative": 73.9,
                   "cross_attn": 74.3}),
    "nonlinearity": dict(model="attentionvig_s", rows={
        "softmax": dict(normalize="softmax"),
        "exp_mean": dict(normalize="mean"),
        "exp": dict(normalize="none"),
    }, paper_top1={"softmax": 80.8, "exp_mean": 80.7, "exp": 81.3}),
    "heads": dict(model="attentionvig_s", rows={
        "no_heads": dict(heads=1),
        "head_dim_6": dict(head_dim=6, heads=None),
        "head_dim_8": dict(head_dim=8, heads=None),
        "8_heads": dict(heads=8),
    }, paper_top1={"no_heads": 81.0, "head_dim_6": 81.1, "head_dim_8": 81.1, "8_heads": 81.3}),
    # The paper's mechanism, tested directly: a fraction p of every node's kNN neighbours
    # replaced by random nodes of its image (ViG harness, graph_corruption), in training and
    # evaluation. No paper figures.
    "robustness": dict(model="vig_ti", rows={
        f"{aggregator}_p{p:g}": dict(aggregator=aggregator, graph_corruption=p)
        for aggregator in ("max_relative", "gin", "cross_attn") for p in (0.0, 0.5, 1.0)},
        paper_top1={}),
}
# The row every other row is compared with, seed by seed (robustness: cross_attn at the same p).
REFERENCE = {"aggregation": "cross_attn", "nonlinearity": "exp", "heads": "8_heads"}


def reference_row(table: str, row: str) -> str:
    if table == "robustness":
        return "cross_attn_p" + row.rsplit("_p", 1)[1]
    return REFERENCE[table]


def paired_difference(values: Dict[int, float], reference: Dict[int, float]) -> Dict:
    """``values[s] - reference[s]`` over the seeds both have: mean, standard deviation and the
    95 % t-interval of the mean; ``distinguishable`` when the interval excludes 0."""
    from scipy.stats import t

    seeds = sorted(set(values) & set(reference))
    differences = [values[seed] - reference[seed] for seed in seeds]
    count = len(differences)
    mean = statistics.mean(differences) if differences else math.nan
    std = statistics.stdev(differences) if count > 1 else math.nan
    half = t.ppf(0.975, count - 1) * std / math.sqrt(count) if count > 1 else math.nan
    return dict(seeds=count, mean=mean, std=std, low=mean - half, high=mean + half,
                distinguishable=bool(count > 1 and (mean - half > 0 or mean + half < 0)))

# Paper Table 3 FLOPs (G), and the original ViG code's counts with its grouped 1x1 convs
# (DESIGN.md section 5); cross-attention has only the paper's figure.
PAPER_MACS = {"gin": 1.3, "sage": 1.6, "edge": 2.4, "max_relative": 1.3, "cross_attn": 1.6}
# The original Vision GNN code's counts (groups = 4); cross-attention has no original code.
ORIGINAL_MACS = {"gin": 1.27, "sage": 1.61, "edge": 2.38, "max_relative": 1.31}

# The CPU profile: the engine's cpu-demo preset (embedded Fashion-MNIST at 32 px, 2 cores), and
# for the ViG a 64-wide ViG-Ti with its 12 blocks and its k / dilation schedule from k = 4: patch 4
# gives 8x8 = 64 nodes, and k * dilation <= 8 * 3 = 24 <= 32, half of them, in every block.
PROFILES = {
    "cpu": dict(
        engine=["--preset", "cpu-demo"],
        models={"vig_ti": (["--epochs", "3"],
                           dict(channels=64, head_hidden_size=256, img_size=32, patch_size=4,
                                k=4)),
                "attentionvig_s": ([], {})}),
}
# Set per run by this script; as engine options they would make the runs differ or collide.
PER_RUN_OPTIONS = ("--model", "--seed", "--output", "--resume", "--aggregator", "--preset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other options go to the training engine: experiments/imagenet.py --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False)  # --seed belongs to the engine, not --seeds
    parser.add_argument("--table", required=True, choices=["flops", *TABLES])
    parser.add_argument("--runs", nargs="+", default=None,
                        help="rows to train (default: all rows of the table)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="cpu: the settings for this 2-core CPU and the embedded data "
                             "(aggregation: 64-wide ViG-Ti at 32 px, 64 nodes, k = 4 to 8, 3 epochs; "
                             "nonlinearity and heads: the cpu-demo preset)")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help="more constructor arguments for every row, as JSON")
    parser.add_argument("--output", type=Path, default=Path("runs/ablation"))
    return parser


def parse_args(argv: Optional[List[str]] = None):
    args, engine_argv = build_parser().parse_known_args(argv)
    for option in engine_argv:
        if option.split("=")[0] in PER_RUN_OPTIONS:
            raise SystemExit(f"{option.split('=')[0]} is set per run by ablation.py; "
                             f"use --runs, --seeds, --output or --profile instead")
    if args.table != "flops":
        rows = TABLES[args.table]["rows"]
        unknown = sorted(set(args.runs or []) - set(rows))
        if unknown:
            raise SystemExit(f"unknown run(s) {', '.join(unknown)} for --table {args.table} "
                             f"(expected some of: {', '.join(rows)})")
        imagenet.parse_args(engine_argv)  # fails now, not after hours, on a bad engine option
    return args, engine_argv


# ---- the flops table ------------------------------------------------------------------------

def flops_rows() -> List[Dict]:
    """Parameters and multiply-adds of ViG-Ti (224 px, batch 1, eval) per aggregator."""
    import timm
    rows = []
    for aggregator in TABLES["aggregation"]["rows"]:
        model = timm.create_model("vig_ti", aggregator=aggregator)
        rows.append(dict(aggregator=aggregator,
                         params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                         macs_g=multiply_adds(model, 224) / 1e9))
    return rows


def flops_table(output: Path) -> str:
    header = ["aggregator", "params (M)", "MACs (G)", "original ViG code (G)",
              "difference to it", "paper Table 3 FLOPs (G)", "difference to it"]
    lines = []
    for row in flops_rows():
        original = ORIGINAL_MACS.get(row["aggregator"])
        paper = PAPER_MACS[row["aggregator"]]
        lines.append([row["aggregator"], f"{row['params_m']:.2f}", f"{row['macs_g']:.3f}",
                      "-" if original is None else f"{original:.2f}",
                      "-" if original is None else f"{row['macs_g'] / original - 1:+.1%}",
                      f"{paper:.1f}", f"{row['macs_g'] / paper - 1:+.1%}"])
    text = (f"ViG-Ti at 224x224, batch 1, eval mode; MACs = torch FlopCounterMode total / 2.\n\n"
            f"{markdown_table(header, lines)}\n")
    output.mkdir(parents=True, exist_ok=True)
    (output / "flops.md").write_text(text)
    return text


# ---- the trained tables ---------------------------------------------------------------------

def run_argv(args, engine_argv: List[str], row: str, seed: int) -> List[str]:
    """The engine command line of one run."""
    table = TABLES[args.table]
    model = table["model"]
    profile_argv, profile_kwargs = [], {}
    if args.profile:
        profile = PROFILES[args.profile]
        profile_argv = profile["engine"] + profile["models"][model][0]
        profile_kwargs = profile["models"][model][1]
    kwargs = {**profile_kwargs, **args.model_kwargs, **table["rows"][row]}
    return [*profile_argv, "--model", model, "--model-kwargs", json.dumps(kwargs),
            "--seed", str(seed), *engine_argv]


def run_folder(args, row: str, seed: int) -> Path:
    return args.output / args.table / row / f"seed{seed}"


def train_runs(args, engine_argv: List[str]) -> None:
    rows = args.runs or list(TABLES[args.table]["rows"])
    plan = [(row, seed) for row in rows for seed in args.seeds]
    for index, (row, seed) in enumerate(plan, 1):
        folder = run_folder(args, row, seed)
        run_args = engine.series_run(folder, run_argv(args, engine_argv, row, seed),
                                     imagenet.parse_args)
        if run_args is None:
            log.info("run %d/%d: %s seed %d already finished (%s)", index, len(plan), row, seed,
                     folder)
            continue
        log.info("run %d/%d: %s seed %d%s", index, len(plan), row, seed,
                 " (resumed)" if run_args.resume else "")
        imagenet.train(run_args)


def collect(args, engine_argv: List[str]) -> List[Dict]:
    """One entry per row that has finished runs: top-1 per seed, its size and training time."""
    table, entries = TABLES[args.table], []
    for row in table["rows"]:
        folders = sorted((args.output / args.table / row).glob("seed*/results.json"))
        results = {int(path.parent.name[4:]): json.loads(path.read_text()) for path in folders}
        if not results:
            continue
        run_args = imagenet.parse_args(run_argv(args, engine_argv, row, args.seeds[0]))
        model = imagenet.build_model(run_args, len(imagenet.class_names(run_args)))
        top1 = {seed: r["final"]["eval"]["top1"] for seed, r in results.items()}
        entries.append(dict(
            row=row, runs=len(top1), top1=top1, mean=statistics.mean(top1.values()),
            std=statistics.stdev(top1.values()) if len(top1) > 1 else math.nan,
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            macs_g=multiply_adds(model, run_args.img_size) / 1e9, img_size=run_args.img_size,
            epochs=next(iter(results.values()))["epochs"],
            minutes=sum(r["train_seconds"] for r in results.values()) / 60,
            paper_top1=table["paper_top1"].get(row, math.nan)))
    by_row = {e["row"]: e for e in entries}
    for entry in entries:
        reference = by_row.get(reference_row(args.table, entry["row"]))
        entry["reference"] = reference_row(args.table, entry["row"])
        entry["vs_reference"] = paired_difference(entry["top1"], reference["top1"] if reference
                                                  else {})
    return entries


def _difference(d: Dict) -> str:
    if d["seeds"] < 2:
        return "-"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def robustness_lines(entries: List[Dict]) -> str:
    """Per aggregator: top-1 at every p and the drop from p = 0, paired over seeds."""
    by_row = {e["row"]: e for e in entries}
    header = ["aggregator", *(f"top-1 at p = {p:g}" for p in (0, 0.5, 1)),
              *(f"drop from p = 0 at p = {p:g} (95 % CI)" for p in (0.5, 1))]
    lines = []
    for aggregator in ("max_relative", "gin", "cross_attn"):
        rows = [by_row.get(f"{aggregator}_p{p:g}") for p in (0, 0.5, 1)]
        if rows[0] is None:
            continue
        drops = [paired_difference(row["top1"], rows[0]["top1"]) if row else None
                 for row in rows[1:]]
        lines.append([aggregator,
                      *(f"{row['mean']:.2f} ± {row['std']:.2f}" if row else "-" for row in rows),
                      *(_difference(drop) + (" *" if drop["distinguishable"] else "")
                        if drop else "-" for drop in drops)])
    return markdown_table(header, lines)


def write_report(args, entries: List[Dict]) -> str:
    header = ["run", "top-1 (%) mean ± std", "per seed", "vs reference: paired difference, "
              "mean [95 % CI]", "distinguishable from noise", "params (M)",
              f"MACs (G) at {entries[0]['img_size']} px", "training (min, all seeds)",
              "paper ImageNet-1K top-1 (%)"]
    lines = []
    for e in entries:
        d = e["vs_reference"]
        reference = e["row"] == e["reference"]
        lines.append([e["row"], f"{e['mean']:.2f} ± {e['std']:.2f}",
                      ", ".join(f"{v:.2f}" for _, v in sorted(e["top1"].items())),
                      "(reference)" if reference else _difference(d),
                      "" if reference or d["seeds"] < 2 else ("yes" if d["distinguishable"]
                                                              else "no"),
                      f"{e['params_m']:.2f}", f"{e['macs_g']:.4f}", f"{e['minutes']:.1f}",
                      "-" if math.isnan(e["paper_top1"]) else f"{e['paper_top1']:.1f}"])
    text = markdown_table(header, lines) + "\n"
    if args.table == "robustness":
        text += "\n" + robustness_lines(entries) + "\n"
    stem = args.output / args.table
    (stem.parent / f"{args.table}.md").write_text(text)
    with open(stem.parent / f"{args.table}.csv", "w", newline="") as handle:
        columns = [k for k in entries[0] if k not in ("top1", "vs_reference")]
        writer = csv.DictWriter(handle, fieldnames=[*columns, "per_seed", "diff_mean",
                                                    "diff_low", "diff_high"])
        writer.writeheader()
        for e in entries:
            d = e["vs_reference"]
            writer.writerow({**{k: e[k] for k in columns},
                             "per_seed": json.dumps(e["top1"]), "diff_mean": d["mean"],
                             "diff_low": d["low"], "diff_high": d["high"]})

    figure, axis = plt.subplots(figsize=(1.2 * len(entries) + 2, 3.8))
    axis.bar([e["row"] for e in entries], [e["mean"] for e in entries],
             yerr=[0 if e["runs"] < 2 else e["std"] for e in entries], capsize=4)
    for index, e in enumerate(entries):  # every seed's result over its bar
        axis.scatter([index] * e["runs"], list(e["top1"].values()), color="black", s=10,
                     zorder=3)
    low = min(min(e["top1"].values()) for e in entries)
    axis.set_ylim(max(0.0, low - 3),
                  min(100.0, max(max(e["top1"].values()) for e in entries) + 1.5))
    axis.set_ylabel("top-1 (%)")
    axis.set_title(f"{args.table}: mean, std and every seed")
    axis.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    figure.savefig(stem.parent / f"{args.table}.png", dpi=100)
    plt.close(figure)
    return text


def main(argv: Optional[List[str]] = None) -> None:
    args, engine_argv = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table == "flops":
        print(flops_table(args.output), end="")
        return
    start = time.time()
    train_runs(args, engine_argv)
    entries = collect(args, engine_argv)
    print(write_report(args, entries), end="")
    print(f"{args.table}: {sum(e['runs'] for e in entries)} runs in {args.output}; "
          f"this invocation took {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
