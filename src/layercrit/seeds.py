"""How a model id names its training seed: ``ID@seedN`` (``zoo:fmnist/baseline@seed1``, ``baseline@seed2``).

An id without the suffix is seed 0 of its method, as the Fashion-MNIST zoo's members are. The zoo resolves the
spelling (:func:`layercrit.zoo.fmnist.resolve`) and the analysis groups models by it
(:mod:`layercrit.analysis.variance`).
"""

from __future__ import annotations

import re

SEED_PATTERN = re.compile(r"^(?P<method>.+)@seed(?P<seed>\d+)$")


def method_and_seed(model_id: str) -> tuple[str, int]:
    """``baseline@seed2`` -> (``baseline``, 2); ``zoo:fmnist/baseline@seed1`` -> (``zoo:fmnist/baseline``, 1); an id
    without ``@seedN`` is seed 0 of itself."""
    match = SEED_PATTERN.match(str(model_id))
    return (match["method"], int(match["seed"])) if match else (str(model_id), 0)


def with_seed(method: str, seed: int) -> str:
    """The id of ``method`` trained with ``seed`` (seed 0 is the method's own id)."""
    return method if seed == 0 else f"{method}@seed{seed}"
