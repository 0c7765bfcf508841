"""Which layers to reset: module kinds and name globs, in network order."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import LayercritError

KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
    "bn": (_BatchNorm,),
    "ln": (nn.LayerNorm, nn.GroupNorm),
}
DEFAULT_LAYERS = "conv,linear"


@dataclass(frozen=True)
class Target:
    """What one row resets: a single module (``modules == [name]``) or a named group reset together."""

    name: str
    modules: list[str]

WRAPPER_PREFIX = "model."


def select_layers(model: nn.Module, layers: str | list[str] = DEFAULT_LAYERS) -> list[str]:
    """Names of the modules selected by ``layers``, in network (registration) order.

    ``layers`` is a comma list (or list) of kinds — ``conv`` (Conv1d/2d/3d), ``linear``, ``bn`` (BatchNorm*),
    ``ln`` (LayerNorm/GroupNorm) — and/or glob patterns over module names (``layer4.*``, ``model.fc``). Patterns
    may leave out the ``model.`` prefix of the normalising wrapper. A pattern that selects nothing is an error.
    """
    patterns = [p.strip() for p in (layers.split(",") if isinstance(layers, str) else layers) if p.strip()]
    if not patterns:
        raise LayercritError("no layers given: use --layers conv,linear (kinds: conv, linear, bn, ln) or name globs")
    modules = [(name, module) for name, module in model.named_modules() if name]
    chosen: set[str] = set()
    for pattern in patterns:
        matched = _match(pattern, modules)
        if not matched:
            names = [_short(n) for n, _ in modules]
            close = difflib.get_close_matches(_short(pattern), names, n=3, cutoff=0.5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise LayercritError(
                f"layer pattern {pattern!r} matches no module (kinds: {', '.join(KINDS)}; or a name glob){hint}"
            )
        chosen.update(matched)
    return [name for name, _ in modules if name in chosen]


def _match(pattern: str, modules: list[tuple[str, nn.Module]]) -> set[str]:
    if pattern in KINDS:
        return {name for name, module in modules if isinstance(module, KINDS[pattern]) and _has_state(module)}
    return {
        name for name, module in modules
        if (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(_short(name), pattern)) and _has_state(module)
    }


def _has_state(module: nn.Module) -> bool:
    """A layer worth resetting owns parameters or buffers itself (not only through children)."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _short(name: str) -> str:
    return name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LayercritError(f"unknown layer {name!r}") from None
