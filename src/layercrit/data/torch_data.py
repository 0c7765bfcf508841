"""torch ``Dataset``s and ``DataLoader``s of ``(image, label)`` → an :class:`~layercrit.data.EvalSet`.

Images may be tensors C×H×W (uint8, or float in [0, 1]; already normalised ones with ``measure(...,
normalize=False)``) or PIL images, which get the model's resize and crop as an image folder's do. A ``Dataset``
gives the paper's subset (the first N of a seeded shuffled ``DataLoader``, as for every other data source); a
``DataLoader`` gives its own first N images, in its own order.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import LayercritError
from ..models.base import Preprocessing
from .evalset import EvalSet, eval_transform, subset_indices

_KINDS = "(image, label) pairs, each image a C×H×W tensor or a PIL image"


def is_torch_data(data: object) -> bool:
    return isinstance(data, Dataset | DataLoader)


def from_torch(data: Dataset | DataLoader, *, preprocessing: Preprocessing | None = None, images: int | None = None,
               seed: int = 0) -> EvalSet:
    """The first ``images`` images of a ``DataLoader``, or the seeded subset of ``images`` of a ``Dataset``."""
    transform = eval_transform(preprocessing or Preprocessing())
    name = type(data.dataset if isinstance(data, DataLoader) else data).__name__
    if isinstance(data, DataLoader):
        pairs = _from_loader(data, images)
        how = f"first {len(pairs)} of a DataLoader"
    else:
        try:
            total = len(data)
        except TypeError:
            raise LayercritError(f"the {name} dataset has no length: pass it in a DataLoader, whose first "
                                 "images are then taken") from None
        pairs = [data[i] for i in subset_indices(total, images, seed)]
        how = f"{len(pairs)} images (seed {seed})"
    if not pairs:
        raise LayercritError(f"the {name} dataset holds no images")
    tensors = [_image(pair, transform, name) for pair in pairs]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise LayercritError(f"the {name} dataset's images have different sizes {sorted(shapes)[:3]}: give it a "
                             "transform that crops them to one size")
    dtypes = {t.dtype for t in tensors}
    stacked = torch.stack([t if dtypes == {torch.uint8} else t.float() for t in tensors])
    labels = torch.tensor([_label(pair, name) for pair in pairs], dtype=torch.int64)
    digest = hashlib.sha256(stacked.contiguous().numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]
    pil = any(not isinstance(pair[0], torch.Tensor) for pair in pairs)
    return EvalSet(images=stacked, labels=labels, data_id=f"{name.lower()}-n{len(labels)}-{digest}",
                   description=f"{name}: {how}", classes=getattr(data, "classes", None),
                   transform=f"PIL images decoded with {(preprocessing or Preprocessing()).transform()}" if pil
                   else "the dataset's tensors as given")


def _from_loader(loader: DataLoader, images: int | None) -> list[tuple]:
    pairs: list[tuple] = []
    try:
        for batch in loader:
            if not isinstance(batch, list | tuple) or len(batch) != 2:
                raise LayercritError(f"a DataLoader for layercrit yields (images, labels) batches, not "
                                     f"{type(batch).__name__}s: give it a dataset of {_KINDS}")
            pairs.extend(zip(*_unbatch(batch), strict=True))
            if images is not None and len(pairs) >= images:
                break
    except TypeError as error:  # the default collate meeting PIL images
        raise LayercritError(f"the DataLoader cannot batch its items ({error}): give its dataset a ToTensor "
                             "transform, or pass the Dataset itself") from None
    return pairs[:images] if images is not None else pairs


def _unbatch(batch) -> tuple[Iterable, Iterable]:
    images, labels = batch
    return (list(images), list(labels)) if isinstance(images, torch.Tensor) else (images, labels)


def _image(pair, transform, name: str) -> torch.Tensor:
    if not isinstance(pair, list | tuple) or len(pair) < 2:
        raise LayercritError(f"the {name} dataset must yield {_KINDS}; it yields {type(pair).__name__}")
    image = pair[0]
    if isinstance(image, torch.Tensor):
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.ndim != 3:
            raise LayercritError(f"the {name} dataset yields images of shape {tuple(image.shape)}: give C×H×W")
        return image
    from PIL import Image

    if isinstance(image, Image.Image):
        return transform(image if image.mode == "L" else image.convert("RGB"))
    raise LayercritError(f"the {name} dataset yields {type(image).__name__} images: give {_KINDS}")


def _label(pair, name: str) -> int:
    label = pair[1]
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        return int(label)
    if isinstance(label, numbers.Integral):
        return int(label)
    raise LayercritError(f"the {name} dataset yields labels of type {type(label).__name__}: give class indices")

