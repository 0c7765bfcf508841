"""Fashion-MNIST from its IDX ``.gz`` files (Debian's dataset-fashion-mnist): the test or training split."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import LayercritError
from .evalset import EvalSet, subset_indices

FASHION_MNIST_ROOTS = ("/usr/share/datasets/fashion-mnist",)


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST.

    A damaged file (truncated or corrupt gzip, wrong header, less or more data than the header says) raises
    :class:`LayercritError` naming the file and what is wrong with it.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:  # not gzip, truncated, bad CRC or deflate data
        raise LayercritError(f"{path} cannot be read ({error.__class__.__name__}: {error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise LayercritError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise LayercritError(f"{path} ends inside its IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) - offset != math.prod(dims):
        raise LayercritError(f"{path} holds {len(data) - offset} bytes of data where its IDX header {dims} says "
                             f"{math.prod(dims)}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def fashion_mnist_files(split: str = "test", root: str | None = None) -> tuple[Path, Path]:
    """Paths of the images and labels IDX files of a Fashion-MNIST split ('train' or 'test')."""
    prefix = "t10k" if split == "test" else "train"
    roots = [root] if root else [os.environ.get("FASHION_MNIST_ROOT"), *FASHION_MNIST_ROOTS]
    for candidate in filter(None, roots):
        images = Path(candidate) / f"{prefix}-images-idx3-ubyte.gz"
        labels = Path(candidate) / f"{prefix}-labels-idx1-ubyte.gz"
        if images.is_file() and labels.is_file():
            return images, labels
    where = root or FASHION_MNIST_ROOTS[0]
    raise LayercritError(
        f"Fashion-MNIST not found in {where}: install it with 'apt-get install dataset-fashion-mnist' "
        "or pass --data-root DIR holding the IDX .gz files"
    )


def load_fashion_mnist(split: str = "test", root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (uint8 N×1×28×28, int64 labels)."""
    image_file, label_file = fashion_mnist_files(split, root)
    fix = ("reinstall it with 'apt-get install --reinstall dataset-fashion-mnist' "
           "or pass --data-root DIR holding good copies of the IDX .gz files")
    try:
        images, labels = read_idx(image_file), read_idx(label_file)
    except LayercritError as error:
        raise LayercritError(f"{error}: {fix}") from None
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise LayercritError(f"{image_file} holds images of shape {images.shape}, not N×28×28: {fix}")
    if labels.ndim != 1 or len(labels) != len(images) or labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise LayercritError(f"{label_file} does not hold one label in 0..9 for each of the {len(images)} images "
                             f"of {image_file.name}: {fix}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist(root: str | None, n: int | None, seed: int, split: str = "test") -> EvalSet:
    images, labels = load_fashion_mnist(split, root)
    chosen = torch.tensor(subset_indices(len(labels), n, seed))
    return EvalSet(
        images=images[chosen],
        labels=labels[chosen],
        data_id=f"fashion-mnist-{split}-n{len(chosen)}-s{seed}",
        description=f"Fashion-MNIST {split} set, {len(chosen)} images (seed {seed})",
        classes=FASHION_MNIST_CLASSES,
        transform="28x28 greyscale images as stored (uint8), fed in [0, 1]; nothing resized",
    )
