"""Models: a spec string → a model ready to measure (:func:`resolve_model`), and the value types that describe it.

Modules: ``base`` (the value types: :class:`Preprocessing`, the normalising wrapper :class:`Normalized`,
:class:`ResolvedModel`; they resolve nothing), ``architectures`` (networks bundled with layercrit), ``builders``
(architecture specs → networks: timm, hf-hub, torchvision, layercrit, the user's factories), ``checkpoints``
(reading and loading state dicts), ``resolve`` (the one door in: every kind of spec, zoos included).
"""

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalized,
    Preprocessing,
    ResolvedModel,
    model_seed,
    wrap_module,
)
from .builders import build_architecture, is_code_spec, load_factory
from .checkpoints import CHECKPOINT_SUFFIXES, load_state_dict, load_strict
from .resolve import resolve_model

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalized",
    "Preprocessing",
    "ResolvedModel",
    "build_architecture",
    "is_code_spec",
    "load_factory",
    "load_state_dict",
    "load_strict",
    "model_seed",
    "resolve_model",
    "wrap_module",
]
