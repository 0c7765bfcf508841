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
from .layers import select_layers
from .measure import measure
from .models import ResolvedModel, resolve_model
from .resets import get_reset
from .sweep import run_sweep

__all__ = [
    "EvalSet",
    "LayercritError",
    "ResolvedModel",
    "__version__",
    "get_reset",
    "load_data",
    "measure",
    "resolve_model",
    "run_sweep",
    "select_layers",
]
