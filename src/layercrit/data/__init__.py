"""Data specs → a fixed evaluation set, decoded once and kept as a uint8 tensor (cached on disk).

Specs:
    DIR             an image folder in ImageNet-val layout (one sub-folder per class, classes sorted), read
                    exactly as torchvision's ``ImageFolder`` with Resize → CenterCrop → ToTensor would
    fashion-mnist   the Fashion-MNIST test set from its IDX ``.gz`` files (Debian's dataset-fashion-mnist)
    fashion-mnist-train  its training set (module criticality is defined on the training set)
    FILE.txt, FILE.jsonl, hf-dataset:REPO[/CONFIG][:SPLIT], python-stdlib, a list of texts, token ids N×T
                    text for a language model: windows of ``seq_len`` tokens of the model's tokenizer
                    (:mod:`layercrit.data.text`)

The subset of N images is the one the paper's code evaluates: the first N images of a ``DataLoader(shuffle=True)``
seeded with ``seed`` (see :func:`subset_indices`).

The disk cache is keyed by everything the decoded images depend on and checked against a checksum whenever it
is read: a damaged entry is decoded again, a cache that cannot be written is skipped (both with a warning).
"""


from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LayercritError
from ..models.base import Preprocessing
from .evalset import EvalSet, eval_transform, subset_indices, to_model_input
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    fashion_mnist,
    fashion_mnist_files,
    load_fashion_mnist,
    read_idx,
)
from .folders import default_cache_dir, image_folder
from .text import is_text_spec, load_text
from .torch_data import from_torch, is_torch_data

__all__ = [
    "FASHION_MNIST_CLASSES",
    "EvalSet",
    "default_cache_dir",
    "eval_transform",
    "fashion_mnist_files",
    "load_data",
    "load_fashion_mnist",
    "read_idx",
    "subset_indices",
    "to_model_input",
]


def load_data(
    spec: str | EvalSet | torch.utils.data.Dataset | torch.utils.data.DataLoader,
    *,
    preprocessing: Preprocessing | None = None,
    images: int | None = 10_000,
    seed: int = 0,
    root: str | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    skip_bad_images: bool = False,
    tokenizer=None,
    seq_len: int = 128,
    text_field: str = "text",
) -> EvalSet:
    """Resolve a data spec (or a torch ``Dataset``/``DataLoader``, see :mod:`layercrit.data.torch_data`) into an
    :class:`EvalSet` of ``images`` images (all when fewer). Text (see the module docstring) becomes ``images``
    windows of ``seq_len`` tokens of ``tokenizer``, read from the ``text_field`` of JSON lines and datasets."""
    if isinstance(spec, EvalSet):
        return spec
    if is_text_spec(spec) or (isinstance(spec, torch.Tensor) and spec.ndim == 2 and not spec.is_floating_point()):
        return load_text(spec, tokenizer, seq_len=seq_len, windows=images, seed=seed, text_field=text_field,
                         cache_dir=cache_dir or default_cache_dir(), use_cache=use_cache)
    if not isinstance(spec, str | Path):
        if not is_torch_data(spec):
            raise LayercritError(f"data must be a spec, an EvalSet, (images, labels) tensors, a torch Dataset or a "
                                 f"DataLoader, not {type(spec).__name__}")
        return from_torch(spec, preprocessing=preprocessing, images=images, seed=seed)
    if spec in ("fashion-mnist", "fmnist"):
        return fashion_mnist(root, images, seed)
    if spec in ("fashion-mnist-train", "fmnist-train"):
        return fashion_mnist(root, images, seed, split="train")
    path = Path(spec)
    if not path.exists():
        raise LayercritError(f"data not found: {spec} (give an image folder in ImageNet-val layout, or 'fashion-mnist')")
    if not path.is_dir():
        raise LayercritError(f"data {spec} is not a folder: give a folder with one sub-folder of images per class")
    return image_folder(path, preprocessing or Preprocessing(), images, seed,
                         cache_dir=cache_dir, use_cache=use_cache, skip_bad_images=skip_bad_images)
