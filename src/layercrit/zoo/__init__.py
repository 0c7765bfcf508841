"""Model zoos: registries of trained models, addressed as ``zoo:ZOO/ID`` wherever a model spec is accepted.

Each zoo is a module of this package with two functions:
    entries() -> list[dict]                       one record per model (id, category, display, accuracy, ...)
    resolve(model_id, pretrained, *, trust_checkpoint=False) -> ResolvedModel
and optionally ``summary() -> DataFrame``, the table ``layercrit zoo list`` prints (default: id, category,
accuracy, display of each record).
"""

from __future__ import annotations

import importlib

from ..errors import LayercritError
from ..models.base import ResolvedModel

ZOOS = {
    "fmnist": "layercrit.zoo.fmnist",  # the bundled Fashion-MNIST zoo (the demo's embedded default)
    "paper": "layercrit.zoo.paper",  # the ResNet-50 zoo of Gavrikov et al. 2024
    "lm": "layercrit.zoo.lm",  # tiny GPT-2s trained on Python's standard library (needs the [lm] extra)
}


def _zoo(name: str):
    if name not in ZOOS:
        raise LayercritError(f"unknown zoo {name!r}: one of {', '.join(ZOOS)}")
    return importlib.import_module(ZOOS[name])


def entries(name: str) -> list[dict]:
    """The records of zoo ``name``."""
    return _zoo(name).entries()


def summary(name: str):
    """Zoo ``name`` as a table, one row per model: the zoo's own ``summary()`` where it has one, else each
    record's id, category, accuracy and display name."""
    import pandas as pd

    module = _zoo(name)
    if hasattr(module, "summary"):
        return module.summary()
    table = pd.DataFrame(module.entries())
    return table[[c for c in ("id", "category", "accuracy", "display") if c in table]]


def resolve(spec: str, *, pretrained: bool = True, trust_checkpoint: bool = False) -> ResolvedModel:
    """Resolve ``zoo:ZOO/ID`` into a model (``trust_checkpoint``: allow weight files holding pickled objects)."""
    body = spec.removeprefix("zoo:")
    name, _, model_id = body.partition("/")
    if not model_id:
        raise LayercritError(f"zoo spec {spec!r} needs an id: zoo:ZOO/ID (see 'layercrit zoo list')")
    resolved = _zoo(name).resolve(model_id, pretrained=pretrained, trust_checkpoint=trust_checkpoint)
    resolved.spec = spec
    return resolved
