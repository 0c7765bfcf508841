"""Model zoos: registries of trained models, addressed as ``zoo:ZOO/ID`` wherever a model spec is accepted.

Each zoo is a module of this package with two functions:
    entries() -> list[dict]                       one record per model (id, category, display, accuracy, ...)
and optionally ``seed_replicates() -> list[dict]`` (training-seed replicates, ids ``ID@seedN``, which
``entries(replicates=True)`` appends),
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


def entries(name: str, *, replicates: bool = False) -> list[dict]:
    """The records of zoo ``name``; with ``replicates``, followed by its training-seed replicates (``ID@seedN``) if
    the zoo has any."""
    module = _zoo(name)
    return module.entries(replicates=True) if replicates and hasattr(module, "seed_replicates") else module.entries()


def summary(name: str, *, replicates: bool = False):
    """Zoo ``name`` as a table, one row per model (with ``replicates``: and per training-seed replicate): the zoo's
    own ``summary()`` where it has one, else each record's id, category, accuracy and display name."""
    import pandas as pd

    module = _zoo(name)
    records = entries(name, replicates=replicates)
    if hasattr(module, "summary"):
        return module.summary(records)
    table = pd.DataFrame(records)
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
