"""Rebuild the Fashion-MNIST files embedded in attvig_pyg/data/fashion_mnist/ from the official ones.

The official files come from the Debian package `dataset-fashion-mnist`
(`apt-get install -y dataset-fashion-mnist`). The test split is copied byte for byte; the training
subset keeps the first PER_CLASS images of every class, in their official order, and is written
in the same IDX format with a fixed gzip timestamp so that the output is reproducible.

    python experiments/make_fashion_mnist_subset.py [--source DIR] [--per-class 1000]
"""
import argparse
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np

from attvig_pyg.data.fashion_mnist import DEBIAN_DIR, EMBEDDED_DIR, FILES, read_idx


def write_idx(path: Path, array: np.ndarray) -> None:
    # IDX header: two zero bytes, dtype code 0x08 (unsigned byte), rank, then big-endian sizes.
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        out.write(header + array.astype(np.uint8).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEBIAN_DIR,
                        help="folder with the four official .gz files (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=1000,
                        help="training images kept per class (default: %(default)s)")
    args = parser.parse_args()

    official = {name: args.source / FILES["full"][name] for name in FILES["full"]}
    missing = [str(p) for p in official.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"Missing official Fashion-MNIST files: {', '.join(missing)}. "
                         "Install them with: apt-get install -y dataset-fashion-mnist")

    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("test_images", "test_labels"):
        shutil.copyfile(official[name], EMBEDDED_DIR / FILES["embedded"][name])

    images = read_idx(official["train_images"])
    labels = read_idx(official["train_labels"])
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:args.per_class]
                                   for c in range(10)]))
    write_idx(EMBEDDED_DIR / FILES["embedded"]["train_images"], images[keep])
    write_idx(EMBEDDED_DIR / FILES["embedded"]["train_labels"], labels[keep])
    size = sum(p.stat().st_size for p in EMBEDDED_DIR.glob("*.gz"))
    print(f"wrote {len(keep)} training and {len(read_idx(official['test_labels']))} test images "
          f"to {EMBEDDED_DIR} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
