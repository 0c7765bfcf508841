"""Value types of a model to measure: its preprocessing, the normalising wrapper, the resolved model. Resolves
nothing (no model sources are imported here)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model input: resize shorter side → center crop → [0, 1] → normalise (in the model).

    ``resize``/``crop`` of None leave the images at their native size (e.g. 28×28 Fashion-MNIST).
    """

    resize: int | None = 256
    crop: int | None = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3  # 0: not known (a model without convolutions); its inputs are fed with their own channels
    source: str = "standard ImageNet eval transform"

    def describe(self) -> str:
        return f"{self.transform()}, mean={self.mean}, std={self.std} ({self.source})"

    def transform(self) -> str:
        """The image transform a decoder applies (image folders, PIL datasets): sizes and interpolation."""
        if self.crop is None and self.resize is None:
            return "native size"
        steps = [f"Resize({self.resize}, {self.interpolation})" if self.resize else "",
                 f"CenterCrop({self.crop})" if self.crop else ""]
        return " -> ".join(step for step in steps if step)


class Normalized(nn.Module):
    """Takes images in [0, 1] and normalises them before the wrapped model, so layer names read ``model.*``."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], in_chans: int = 3):
        super().__init__()
        self.model = model
        self.in_chans = in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_chans == 3:  # greyscale data into an RGB model
            x = x.expand(-1, 3, -1, -1)
        return self.model((x - self.mean) / self.std)


@dataclass
class ResolvedModel:
    """A trained model ready to measure, plus what is needed to reset its layers and feed it."""

    model: nn.Module
    fresh: Callable[[], nn.Module] | None
    preprocessing: Preprocessing
    spec: str
    num_classes: int
    metadata: dict = field(default_factory=dict)
    tokenizer: Any = None  # a transformers tokenizer, for models that read text (see layercrit.models.hf)


def model_seed(seed: int, model_id: str) -> int:
    """The torch seed a model is built under (see :func:`resolve_model`): the same for (seed, id) everywhere."""
    digest = hashlib.sha256(f"layercrit-model:{seed}:{model_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def wrap_module(
    model: nn.Module,
    fresh: Callable[[], nn.Module] | None = None,
    preprocessing: Preprocessing | None = None,
    spec: str = "python:nn.Module",
) -> ResolvedModel:
    """Wrap a user's ``nn.Module`` (and optional factory for fresh instances) for measuring."""
    pre = preprocessing or Preprocessing(source="given by the caller")
    return finish(model, pre, spec, fresh)


def finish(
    module: nn.Module, pre: Preprocessing, spec: str, fresh_bare: Callable[[], nn.Module] | None
) -> ResolvedModel:
    def wrap(m: nn.Module) -> nn.Module:
        return Normalized(m, pre.mean, pre.std, pre.in_chans).eval()

    fresh = (lambda: wrap(fresh_bare())) if fresh_bare is not None else None
    return ResolvedModel(
        model=wrap(module), fresh=fresh, preprocessing=pre, spec=spec, num_classes=_num_classes(module)
    )


def _num_classes(module: nn.Module) -> int:
    if getattr(module, "num_classes", None):
        return int(module.num_classes)
    last = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if last:
        return last[-1].out_features
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else 0


def match_mean_to_channels(pre: Preprocessing) -> Preprocessing:
    if len(pre.mean) != pre.in_chans and pre.in_chans == 1:
        return replace(pre, mean=(sum(pre.mean) / len(pre.mean),), std=(sum(pre.std) / len(pre.std),))
    return pre
