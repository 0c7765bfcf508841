"""Models: where networks come from (architectures, builders, checkpoints, transformers) and the value types that
describe a model ready to measure; :func:`layercrit.resolve.resolve_model` turns any spec, zoos included, into one.

Modules: ``base`` (the value types: :class:`Preprocessing`, the normalising wrapper :class:`Normalized`,
:class:`ResolvedModel`; they resolve nothing), ``architectures`` (networks bundled with layercrit), ``builders``
(architecture specs → networks: timm, hf-hub, torchvision, layercrit, the user's factories), ``checkpoints``
(reading and loading state dicts), ``hf`` (transformers models).
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
    "wrap_module",
]
