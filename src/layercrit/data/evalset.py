"""The evaluation set: a fixed set of images and labels, decoded once (a value type: it resolves nothing), and the
seeded subset and image transform every data source shares."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import LayercritError
from ..models.base import Preprocessing


@dataclass
class EvalSet:
    """A fixed set of evaluation images (uint8 N×C×H×W, or float in [0, 1]) and their integer labels."""

    images: torch.Tensor
    labels: torch.Tensor
    data_id: str
    description: str
    classes: Sequence[str] | None = None
    n_skipped: int = 0
    decode: Callable[[Sequence[int]], torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, redecode: bool = False) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Yield ``(positions, images, labels)``; ``redecode`` reads the images from their source again (naive path)."""
        for start in range(0, len(self), batch_size):
            part = slice(start, min(start + batch_size, len(self)))
            if redecode and self.decode is not None:
                images = self.decode(range(part.start, part.stop))
            else:
                images = self.images[part]
            yield part, images, self.labels[part]

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor, description: str = "tensors", *,
                     check_range: bool = True) -> EvalSet:
        """``check_range=False`` takes float images in any range (already normalised, for a model that gets them as
        they are)."""
        if images.ndim != 4 or len(images) != len(labels):
            raise LayercritError(f"images must be N×C×H×W with one label each, got {tuple(images.shape)} and {len(labels)} labels")
        if check_range and images.is_floating_point() and (images.min() < 0 or images.max() > 1):
            raise LayercritError("float images must be in [0, 1] (the model wrapper normalises them)")
        digest = hashlib.sha256(images.contiguous().numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]
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
