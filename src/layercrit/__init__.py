"""layercrit: how much each layer of a trained vision model matters to its predictions.

    import layercrit
    df = layercrit.measure("timm:resnet18", "fashion-mnist", layers="conv,linear", reset="rerandomize", trials=3)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layercrit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

from .data import EvalSet, load_data
from .errors import LayercritError
from .layers import select_layers, select_targets
from .measure import measure
from .models import ResolvedModel, resolve_model
from .module_criticality import module_criticality
from .resets import get_reset
from .sweep import run_sweep


def __getattr__(name: str):
    if name == "analyze":  # scipy and matplotlib take seconds to import: only when asked for
        from .analysis import analyze

        return analyze
    raise AttributeError(f"module 'layercrit' has no attribute {name!r}")


__all__ = [
    "EvalSet",
    "LayercritError",
    "ResolvedModel",
    "__version__",
    "analyze",
    "get_reset",
    "load_data",
    "measure",
    "module_criticality",
    "resolve_model",
    "run_sweep",
    "select_layers",
    "select_targets",
]
