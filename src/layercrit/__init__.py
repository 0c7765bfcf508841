"""layercrit: how much each layer of a trained vision model matters to its predictions.

    import layercrit
    df = layercrit.measure("timm:resnet18", "fashion-mnist", layers="conv,linear", reset="rerandomize", trials=3)

The public names are imported when first used, so that ``import layercrit`` (and ``layercrit --help``) does not
load torch.
"""

import importlib

from ._version import __version__
from .errors import LayercritError

_PUBLIC = {  # name -> the module that defines it
    "EvalSet": "data",
    "ResolvedModel": "models",
    "TASKS": "measurement.tasks",
    "Task": "measurement.tasks",
    "analyze": "analysis.tables",
    "get_reset": "measurement.resets",
    "load_data": "data",
    "load_logits": "measurement.logits",
    "measure": "measurement.measure",
    "module_criticality": "measurement.module_criticality",
    "resolve_model": "resolve",
    "run_sweep": "sweeps.sweep",
    "select_layers": "measurement.layers",
    "select_targets": "measurement.layers",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'layercrit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__all__ = ["LayercritError", "__version__", *sorted(_PUBLIC)]
