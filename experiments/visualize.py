"""What a trained AttentionViG's cross-attention does, as the paper shows it: Fig. 6 (a location's
query against every key, its graph neighbours and their weights, per Grapher layer), Fig. 7
(the affinity exp(-beta (1 - s)) of every layer's learned beta) and Table 8 (the betas).

    python experiments/visualize.py --checkpoint runs/x/best.pth                 # test images
    python experiments/visualize.py --checkpoint runs/x/best.pth --images a.png b.png \\
        --points 10,20 --img-size 64 --output figures/

Writes into --output (default: CHECKPOINT's folder / figures): attention_<i>.png per image,
betas.png, betas.md and betas.csv. How to read them: docs/visualize.md.
"""
import argparse
import csv
import io
import re
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image

import engine
import imagenet
from attvig_pyg.models.inspection import LayerAttention, attention_maps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Figures of a trained AttentionViG's cross-attention (paper Fig. 6, Fig. 7, "
                    "Table 8)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a checkpoint of experiments/imagenet.py (best.pth or last.pth)")
    parser.add_argument("--images", type=Path, nargs="+", default=None,
                        help="image files; default: --count images of the run's test split, "
                             "one per class")
    parser.add_argument("--count", type=int, default=4, help="test images without --images")
    parser.add_argument("--points", nargs="+", default=None, metavar="ROW,COL",
                        help="the location per image in input pixels (one for all, or one per "
                             "image); default: the centre")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size; default: the run's (the graphs follow the size)")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for the figures (default: CHECKPOINT's folder/figures)")
    return parser


def parse_points(texts: Optional[Sequence[str]]) -> Optional[List[List[float]]]:
    if texts is None:
        return None
    try:
        points = [[float(v) for v in text.split(",")] for text in texts]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 for p in points):
        raise SystemExit(f"--points: expected ROW,COL pairs such as 16,16 (got {' '.join(texts)})")
    return points


def load_run(path: Path, img_size: Optional[int]):
    """The checkpoint's model with the weights it names (rebuilt from the run's settings), the
    run's settings and its evaluation transform at ``img_size``."""
    if not path.is_file():
        raise SystemExit(f"--checkpoint: no such file: {path}")
    saved = engine.load_checkpoint(path, imagenet.PROGRAM)
    settings = engine.settings_from_checkpoint(imagenet.parse_args([]), saved["config"], (),
                                               "visualize")
    if img_size is not None:
        settings.img_size = img_size
    model = imagenet.build_model(settings, len(saved["info"]["classes"]))
    model.load_state_dict(saved[saved["weights"]])
    transform = imagenet.build_transforms(settings, imagenet.data_config(settings, model))[1]
    return model.eval(), settings, transform, saved


def load_images(args, settings, transform):
    """Preprocessed images and their labels: the files given, or one test image per class."""
    if args.images is not None:
        images = []
        for path in args.images:
            try:
                images.append(transform(Image.open(path).convert("RGB")))
            except (OSError, ValueError) as error:
                raise SystemExit(f"--images: cannot read {path}: {error}") from None
        return torch.stack(images), [path.name for path in args.images]
    dataset = imagenet.build_dataset(settings, "eval", transform)
    chosen, labels = [], []
    for index in range(len(dataset)):
        image, label = dataset[index]
        if label not in labels:
            chosen.append(image)
            labels.append(label)
        if len(chosen) == args.count:
            break
    names = getattr(dataset, "classes", None)
    return torch.stack(chosen), [names[label] if names else str(label) for label in labels]


def layer_title(name: str) -> str:
    """'stages.0.blocks.2.mixer.conv' -> 'stage 1, block 3'; 'blocks.4.0.conv.conv' ->
    'block 5'."""
    stage = re.search(r"stages\.(\d+)\.blocks\.(\d+)", name)
    if stage:
        return f"stage {int(stage[1]) + 1}, block {int(stage[2]) + 1}"
    block = re.search(r"blocks\.(\d+)", name)
    return f"block {int(block[1]) + 1}" if block else name


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=110, format="png")
    with engine.atomic_file(path) as temporary:
        temporary.write_bytes(buffer.getvalue())


def attention_figure(image: torch.Tensor, title: str, layers: List[LayerAttention], index: int,
                     mean, std, path: Path) -> None:
    """Fig. 6 for one image: the image with its point, then per layer the similarity heatmap
    (mean over heads) over the image with the point's neighbours sized by their weight."""
    import matplotlib.pyplot as plt

    picture = (image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1))
    picture = picture.clamp(0, 1).permute(1, 2, 0).numpy()
    height, width = picture.shape[:2]
    columns = 3
    rows = (len(layers) + 1 + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.8 * rows),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    first = layers[0]
    scale_y, scale_x = height / first.grid[0], width / first.grid[1]
    point = first.points[index].float()
    axes[0, 0].imshow(picture)
    axes[0, 0].scatter([(point[1] + 0.5) * scale_x - 0.5], [(point[0] + 0.5) * scale_y - 0.5],
                       marker="*", s=260, c="yellow", edgecolors="black")
    axes[0, 0].set_title(f"{title}\n(the query location: star)", fontsize=10)
    weight_max = max((float(layer.weights[index].mean(dim=1).max()) for layer in layers
                      if len(layer.weights[index])), default=1.0)
    for axis, layer in zip(axes.flat[1:], layers):
        grid_h, grid_w = layer.grid
        similarity = layer.similarity[index].mean(dim=0).numpy()
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        axis.imshow(picture, extent=extent)
        shown = axis.imshow(similarity, cmap="coolwarm", vmin=-1, vmax=1, alpha=0.6,
                            extent=extent, interpolation="nearest")
        centre = lambda rc: ((rc[:, 1].float() + 0.5) * width / grid_w - 0.5,  # noqa: E731
                             (rc[:, 0].float() + 0.5) * height / grid_h - 0.5)
        neighbours = layer.neighbours[index]
        if len(neighbours):
            x, y = centre(neighbours)
            weights = layer.weights[index].mean(dim=1).numpy()
            axis.scatter(x, y, s=20 + 280 * weights / weight_max, facecolors="none",
                         edgecolors="black", linewidths=1.5)
        x, y = centre(layer.points[index:index + 1])
        axis.scatter(x, y, marker="*", s=200, c="yellow", edgecolors="black")
        axis.set_title(f"{layer_title(layer.name)}: {grid_h}x{grid_w} map, beta "
                       f"{layer.beta:.2f}\n{len(neighbours)} neighbours (circle area: weight)",
                       fontsize=9)
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02,
                        label="query-key cosine similarity (mean of heads)")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def beta_figure(betas: List[tuple], path: Path) -> None:
    """Fig. 7: exp(-beta (1 - s)) over s in [-1, 1], a curve per layer."""
    import matplotlib.pyplot as plt

    similarity = torch.linspace(-1, 1, 201)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("viridis")
    for i, (title, beta) in enumerate(betas):
        axis.plot(similarity, torch.exp(-beta * (1 - similarity)),
                  color=colours(i / max(len(betas) - 1, 1)), label=f"{title}: beta {beta:.2f}")
    axis.set(xlabel="cosine similarity s of query and key",
             ylabel="affinity exp(-beta (1 - s))",
             title="Learned sharpness per cross-attention layer (paper Fig. 7)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def beta_tables(betas: List[tuple], output: Path, source: str) -> None:
    """Table 8: the learned betas, as markdown and CSV."""
    lines = [f"Learned beta per cross-attention layer ({source}; paper Table 8).", "",
             "| layer | beta |", "|---|---|"]
    lines += [f"| {title} | {beta:.3f} |" for title, beta in betas]
    with engine.atomic_file(output / "betas.md") as temporary:
        temporary.write_text("\n".join(lines) + "\n")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["layer", "beta"])
    writer.writerows([title, f"{beta:.6f}"] for title, beta in betas)
    with engine.atomic_file(output / "betas.csv") as temporary:
        temporary.write_text(text.getvalue())


def write_figures(checkpoint: Path, output: Optional[Path] = None, images=None, count: int = 4,
                  points=None, img_size: Optional[int] = None) -> Path:
    """Every figure and table for ``checkpoint``, into ``output``; returns the folder. Raises
    ValueError for a model without cross-attention or points outside the images."""
    import matplotlib
    matplotlib.use("Agg")

    args = argparse.Namespace(images=images, count=count)
    model, settings, transform, saved = load_run(checkpoint, img_size)
    batch, titles = load_images(args, settings, transform)
    layers = attention_maps(model, batch, points)  # ValueError: no cross-attention, bad points
    output = output or checkpoint.parent / "figures"
    engine.make_folder(output)
    config = imagenet.data_config(settings, model)
    for index, title in enumerate(titles):
        attention_figure(batch[index], f"{title} ({settings.img_size} px)", layers, index,
                         config["mean"], config["std"], output / f"attention_{index}.png")
    betas = [(layer_title(layer.name), layer.beta) for layer in layers]
    beta_figure(betas, output / "betas.png")
    beta_tables(betas, output, f"{settings.model}, {checkpoint}, {saved['weights']} weights, "
                               f"epoch {saved['epoch']}")
    return output


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    if args.count < 1 or (args.img_size is not None and args.img_size < 32):
        raise SystemExit("--count must be positive and --img-size at least 32")
    try:
        output = write_figures(args.checkpoint, args.output, args.images, args.count,
                               parse_points(args.points), args.img_size)
    except ValueError as error:
        raise SystemExit(f"{args.checkpoint}: {error}") from None
    print(f"figures written to {output}")
    return output


if __name__ == "__main__":
    main()
