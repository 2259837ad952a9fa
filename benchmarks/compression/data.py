"""Fashion-MNIST from its IDX files (Debian package ``dataset-fashion-mnist``), as float tensors in memory."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import numpy as np
import torch

from . import BenchmarkError

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
INSTALL_HINT = ("Fashion-MNIST not found. Install it with `apt-get install -y dataset-fashion-mnist` "
                "(`dpkg -L dataset-fashion-mnist` lists the IDX files), or pass --data-dir with the four "
                "*-idx?-ubyte.gz files.")
# per-pixel statistics of the Fashion-MNIST training set (pixels scaled to [0, 1])
MEAN, STD = 0.2860, 0.3530


def find_data_dir(data_dir: str | None) -> Path:
    candidates = [Path(data_dir)] if data_dir else [Path(d) for d in DEFAULT_DIRS] + fashion_mnist_package_dirs()
    for folder in candidates:
        if all((folder / name).exists() for pair in FILES.values() for name in pair):
            return folder
    raise BenchmarkError(INSTALL_HINT + (f" Looked in {data_dir}." if data_dir else ""))


def fashion_mnist_package_dirs() -> list[Path]:
    """Folders of the Debian package dataset-fashion-mnist that hold its IDX files (empty without dpkg)."""
    try:
        listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True,
                                 check=False).stdout
    except OSError:
        return []
    return sorted({Path(line).parent for line in listing.splitlines() if line.endswith("-ubyte.gz")})


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_split(folder: Path, split: str, limit: int | None = None, seed: int = 0, offset: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, 1, 28, 28) float32 and labels (N,) int64; ``limit`` takes a fixed random subset:
    positions ``offset .. offset + limit`` of one seeded permutation, so subsets with different offsets (a
    training set and a validation set) are disjoint."""
    images_file, labels_file = FILES[split]
    images = _read_idx(folder / images_file, 16).reshape(-1, 1, 28, 28)   # IDX3 header: 16 bytes
    labels = _read_idx(folder / labels_file, 8)                           # IDX1 header: 8 bytes
    if offset or (limit is not None and limit < len(labels)):
        end = None if limit is None else offset + limit
        index = np.random.default_rng(seed).permutation(len(labels))[offset:end]
        images, labels = images[index], labels[index]
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))
