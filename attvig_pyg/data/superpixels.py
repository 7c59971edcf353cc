"""Superpixel graphs of Fashion-MNIST, built as "Benchmarking Graph Neural Networks" (Dwivedi et
al., 2020) builds its MNIST and CIFAR10 graphs: SLIC superpixels as nodes, each joined to its 8
most affine superpixels, the affinity as the edge feature. Built from local files only (the
embedded subset, or the Debian package's full set), once, and cached."""
import hashlib
import json
import os
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch_geometric.data import Data, InMemoryDataset

from attvig_pyg.data.fashion_mnist import CLASSES, load_fashion_mnist
from attvig_pyg.data.scenes import DEFAULT_ROOT

# Dwivedi et al.'s settings: at most 75 superpixels (SLIC asked for 95, then one fewer until at
# most 75 come out), compactness 0.25, 8 neighbours per node.
SETTINGS = dict(max_nodes=75, first_segments=95, compactness=0.25, neighbours=8)
SPLITS = ("train", "val", "test")
VALIDATION = {True: 5000, False: 1000}  # images held out of the training images (full / embedded)


def superpixel_graph(image: np.ndarray, max_nodes: int = 75, first_segments: int = 95,
                     compactness: float = 0.25, neighbours: int = 8) -> Data:
    r"""The superpixel graph of one greyscale image ``[H, W]`` (uint8 or floats in [0, 1]).

    Nodes: SLIC superpixels (scikit-image), asking for ``first_segments`` and one fewer until at
    most ``max_nodes`` come out. Node features ``x`` ``[n, 3]``: mean intensity in [0, 1], then
    the centroid's row and column divided by the image size (also ``pos``). Edges: every node
    :math:`i` sends to its ``neighbours`` most affine other nodes :math:`j` (all others if it
    has fewer), with affinity
    :math:`A_{ij} = \exp(-(d^{xy}_{ij} / \sigma^{xy}_i)^2 - (d^{f}_{ij} / \sigma^f_i)^2)`,
    :math:`d^{xy}` the distance of centroids, :math:`d^f` of intensities (both symmetric) and
    :math:`\sigma^{xy}_i`, :math:`\sigma^f_i` node :math:`i`'s mean distance to its
    ``neighbours`` nearest others (as Dwivedi et al.; so :math:`A` itself is not symmetric);
    ``edge_attr`` ``[E, 1]`` holds :math:`A_{ij}`, in (0, 1] (in float32 a weight between a node
    of flat surroundings and one of another intensity could underflow to 0; none did on the
    images tested).
    """
    from skimage.segmentation import slic

    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 2:
        raise ValueError(f"Expected a greyscale image [H, W] (got shape {pixels.shape})")
    if pixels.max() > 1:
        pixels = pixels / 255.0
    segments_asked = first_segments
    while True:
        segments = slic(pixels, n_segments=segments_asked, compactness=compactness,
                        channel_axis=None, start_label=0)
        if segments.max() + 1 <= max_nodes or segments_asked <= 1:
            break
        segments_asked -= 1
    labels = np.unique(segments)
    count = len(labels)
    height, width = pixels.shape
    rows, cols = np.indices(pixels.shape)
    intensity = np.array([pixels[segments == label].mean() for label in labels])
    centroid = np.stack([np.array([rows[segments == label].mean(), cols[segments == label].mean()])
                         for label in labels]) / np.array([height, width])

    def pairwise(values: np.ndarray) -> np.ndarray:
        return np.sqrt(((values[:, None, :] - values[None, :, :]) ** 2).sum(-1))

    def scale(distance: np.ndarray) -> np.ndarray:
        """Per node, the mean distance to its ``neighbours`` nearest others (plus 1e-8, as
        Dwivedi et al.)."""
        nearest = np.sort(distance, axis=1)[:, 1:neighbours + 1]  # column 0: the node itself
        return (nearest.mean(axis=1, keepdims=True) if nearest.size else
                np.ones((len(distance), 1))) + 1e-8

    distance_xy, distance_f = pairwise(centroid), pairwise(intensity[:, None])
    # Row i scaled by node i's sigmas, as Dwivedi et al.: A[i, j] is the edge i -> j's feature.
    affinity = np.exp(-(distance_xy / scale(distance_xy)) ** 2 -
                      (distance_f / scale(distance_f)) ** 2)
    np.fill_diagonal(affinity, -np.inf)  # never its own neighbour
    degree = min(neighbours, count - 1)
    targets = np.argsort(-affinity, axis=1, kind="stable")[:, :degree].reshape(-1)
    sources = np.repeat(np.arange(count), degree)
    features = np.concatenate([intensity[:, None], centroid], axis=1)
    return Data(x=torch.tensor(features, dtype=torch.float32),
                pos=torch.tensor(centroid, dtype=torch.float32),
                edge_index=torch.tensor(np.stack([sources, targets]), dtype=torch.long),
                edge_attr=torch.tensor(affinity[sources, targets], dtype=torch.float32)[:, None])


def _graph_arrays(arguments) -> Dict[str, np.ndarray]:
    """A worker's graph as NumPy arrays: tensors sent between processes would each go through
    torch's shared-memory handover, which is far slower than pickling for graphs this small."""
    image, settings = arguments
    return {key: value.numpy() for key, value in superpixel_graph(image, **settings)}


class FashionMNISTSuperpixels(InMemoryDataset):
    """Fashion-MNIST as superpixel graphs (:func:`superpixel_graph`), for graph
    classification: 55,000 / 5,000 / 10,000 graphs (train / val / test) from the Debian
    package's images with ``full=True``, or 9,000 / 1,000 / 10,000 from the embedded ones. The
    validation images are a fixed, seeded draw from the training images.

    Each split is built at first use (a progress bar; one process per core) and cached under
    ``root`` (default ``$ATTVIG_DATA/superpixels`` or ``~/.cache/attvig_pyg/superpixels``) in a
    file named by its settings, so that other settings build anew.

    Args:
        root: Cache folder.
        split: ``"train"``, ``"val"`` or ``"test"``.
        full: The official 60,000 training images instead of the embedded 10,000.
        settings: :func:`superpixel_graph`'s arguments (default: Dwivedi et al.'s).
        transform, pre_filter: as for any PyG dataset.
    """

    classes = CLASSES

    def __init__(self, root: Optional[str] = None, split: str = "train", full: bool = False,
                 settings: Optional[Dict] = None, transform=None, pre_filter=None,
                 workers: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"Unknown split '{split}' (expected one of {', '.join(SPLITS)})")
        unknown = set(settings or {}) - set(SETTINGS)
        if unknown:
            raise ValueError(f"Unknown superpixel settings {sorted(unknown)} (expected some of "
                             f"{sorted(SETTINGS)})")
        self.split, self.full = split, full
        self.settings = dict(SETTINGS, **(settings or {}))
        self.workers = workers or os.cpu_count() or 1
        root = Path(root) if root is not None else DEFAULT_ROOT / "superpixels"
        super().__init__(str(root), transform, pre_filter=pre_filter)
        self.load(self.processed_paths[0])

    @property
    def raw_file_names(self):
        return []  # the images come from attvig_pyg.data.load_fashion_mnist

    def download(self):
        pass

    @property
    def processed_file_names(self):
        fingerprint = hashlib.sha256(json.dumps(dict(self.settings, full=self.full),
                                                sort_keys=True).encode()).hexdigest()[:12]
        source = "full" if self.full else "embedded"
        return [f"{self.split}-{source}-{fingerprint}.pt"]

    def _images(self):
        images, labels = load_fashion_mnist("test" if self.split == "test" else "train",
                                            full=self.full)
        if self.split == "test":
            return images, labels
        held_out = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        held_out = held_out[:VALIDATION[self.full]]
        chosen = torch.zeros(len(labels), dtype=torch.bool)
        chosen[held_out] = True
        if self.split == "train":
            chosen = ~chosen
        return images[chosen], labels[chosen]

    def process(self):
        from tqdm import tqdm

        images, labels = self._images()
        work = [(image, self.settings) for image in images.numpy()]
        description = f"superpixel graphs, {self.split} ({len(work)} images)"
        if self.workers > 1:
            with get_context("spawn").Pool(self.workers) as pool:
                arrays = list(tqdm(pool.imap(_graph_arrays, work, chunksize=64),
                                   total=len(work), desc=description))
        else:
            arrays = [_graph_arrays(item) for item in tqdm(work, desc=description)]
        graphs = [Data(**{key: torch.from_numpy(value) for key, value in graph.items()},
                       y=torch.tensor([label])) for graph, label in zip(arrays, labels.tolist())]
        if self.pre_filter is not None:
            graphs = [graph for graph in graphs if self.pre_filter(graph)]
        self.save(graphs, self.processed_paths[0])
