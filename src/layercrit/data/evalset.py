"""The evaluation set: a fixed set of images and labels, decoded once (a value type: it resolves nothing), and the
seeded subset and image transform every data source shares."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import LayercritError
from ..models.base import Preprocessing


@dataclass
class EvalSet:
    """A fixed evaluation set: the inputs of N examples and their integer labels.

    ``images`` holds the inputs as the run's task takes them (:mod:`layercrit.measurement.tasks`): images uint8
    N×C×H×W (or float in [0, 1]) for image classification; token ids N×T, or a dict of such tensors, for others.
    """

    images: Any
    labels: torch.Tensor
    data_id: str
    description: str
    classes: Sequence[str] | None = None
    n_skipped: int = 0
    transform: str = "the inputs as given"  # exactly what was done to the source's images, for the printout
    decode: Callable[[Sequence[int]], torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, redecode: bool = False) -> Iterator[tuple[slice, Any, torch.Tensor]]:
        """Yield ``(positions, inputs, labels)``; ``redecode`` reads the images from their source again (naive path)."""
        for start in range(0, len(self), batch_size):
            part = slice(start, min(start + batch_size, len(self)))
            if redecode and self.decode is not None:
                inputs = self.decode(range(part.start, part.stop))
            else:
                inputs = tree_map(lambda t, part=part: t[part] if isinstance(t, torch.Tensor) else t, self.images)
            yield part, inputs, self.labels[part]

    @classmethod
    def from_tensors(cls, images: Any, labels: torch.Tensor, description: str = "tensors", *,
                     check_range: bool = True) -> EvalSet:
        """Inputs (a tensor, or a dict of tensors, examples first) and one label each. ``check_range`` refuses
        float images outside [0, 1]; ``check_range=False`` takes them in any range (already normalised, for a model
        that gets them as they are)."""
        tensors = [t for t in tree_flatten(images)[0] if isinstance(t, torch.Tensor)]
        if not tensors or any(len(t) != len(labels) for t in tensors):
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors) or type(images).__name__
            raise LayercritError(f"give the inputs with one label each (examples first), got {shapes} and "
                                 f"{len(labels)} labels")
        if check_range and isinstance(images, torch.Tensor) and images.is_floating_point() and (
                images.min() < 0 or images.max() > 1):
            raise LayercritError("float images must be in [0, 1] (the model wrapper normalises them)")
        data = b"".join(t.contiguous().numpy().tobytes() for t in tensors) + labels.numpy().tobytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        return cls(images=images, labels=labels.long(), data_id=f"tensors-{digest}", description=description)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [0, 1], exactly as ``torchvision.transforms.ToTensor`` computes it."""
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


def subset_indices(n_total: int, n: int | None, seed: int) -> list[int]:
    """The first ``n`` indices a ``DataLoader(dataset, shuffle=True, generator=Generator().manual_seed(seed))`` yields.

    The loader's iterator draws one int64 from the generator (its worker base seed) before the sampler's
    ``randperm``; we replay both so the subset is the paper's, image for image.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n_total, generator=generator).tolist()
    return order if n is None or n >= n_total else order[:n]


def eval_transform(pre: Preprocessing):
    from torchvision import transforms

    steps = []
    mode = transforms.InterpolationMode(pre.interpolation)
    if pre.resize is not None:
        steps.append(transforms.Resize(pre.resize, interpolation=mode))
    if pre.crop is not None:
        steps.append(transforms.CenterCrop(pre.crop))
    steps.append(transforms.PILToTensor())
    return transforms.Compose(steps)
