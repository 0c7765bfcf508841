"""Which layers to reset: module kinds and name globs, in network order; groups of them reset together.

:func:`select_layers` picks modules; :func:`select_targets` turns them into the :class:`Target` list the engine
resets one at a time: every layer alone, or ``groups`` (a residual block, a stage, groups from a file), optionally
``cumulative`` (targets 1..k or k..L together).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config_files import error_text, load_json, load_yaml
from ..errors import LayercritError
from ..spec import DEFAULT_LAYERS

KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),  # and transformers' Conv1D (GPT-2's linear layers), recognised by name: see is_kind
    "bn": (_BatchNorm,),
    "ln": (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm),
    "embedding": (nn.Embedding,),
}
# Kinds of layers defined outside torch, by class name: transformers' GPT-2 ``Conv1D`` is a linear layer (its
# weight transposed), and Llama-style models bring their own ``...RMSNorm`` classes.
KIND_CLASS_NAMES: dict[str, tuple[str, ...]] = {"linear": ("Conv1D",), "ln": ("RMSNorm", "LayerNorm")}


@dataclass(frozen=True)
class Target:
    """What one row resets: a single module (``modules == [name]``) or a named group reset together."""

    name: str
    modules: list[str]


WRAPPER_PREFIX = "model."
GROUPINGS = ("blocks", "stages")
TRANSFORMER_GROUPINGS = ("blocks", "attention", "mlp", "window:N")
CUMULATIVE = ("prefix", "suffix")
_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
_INDEXED = re.compile(r"\d$")  # children named like a position: 0, layer3, s2, b1, encoder_layer_4


def select_layers(model: nn.Module, layers: str | list[str] = DEFAULT_LAYERS) -> list[str]:
    """Names of the modules selected by ``layers``, in network (registration) order.

    ``layers`` is a comma list (or list) of kinds — ``conv`` (Conv1d/2d/3d), ``linear`` (Linear, transformers'
    Conv1D), ``bn`` (BatchNorm*), ``ln`` (LayerNorm/GroupNorm) — and/or glob patterns over module names
    (``layer4.*``, ``model.fc``). Patterns may leave out the ``model.`` prefix of the normalising wrapper. A pattern
    that selects nothing is an error, except in the default (``conv,linear``), which takes the kinds the model has
    (an MLP: its linear layers).
    """
    patterns = [p.strip() for p in (layers.split(",") if isinstance(layers, str) else layers) if p.strip()]
    if not patterns:
        raise LayercritError(f"layers={layers!r}: give kinds (conv, linear, bn, ln) and/or name globs, e.g. layers='conv,linear'")
    modules = [(name, module) for name, module in model.named_modules() if name]
    if layers == DEFAULT_LAYERS:
        patterns = [kind for kind in patterns if _match(kind, modules)] or patterns
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
        return {name for name, module in modules if is_kind(module, pattern) and _has_state(module)}
    return {
        name for name, module in modules
        if (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(_short(name), pattern)) and _has_state(module)
    }


def is_kind(module: nn.Module, kind: str) -> bool:
    """Whether ``module`` is a layer of ``kind`` (a torch class of :data:`KINDS`, or a class named as in
    :data:`KIND_CLASS_NAMES`)."""
    name = type(module).__name__
    return isinstance(module, KINDS[kind]) or any(name.endswith(n) for n in KIND_CLASS_NAMES.get(kind, ()))


def _has_state(module: nn.Module) -> bool:
    """A layer worth resetting owns parameters or buffers itself (not only through children)."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _short(name: str) -> str:
    return name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name


# ---------------------------------------------------------------- targets: layers, groups, cumulative


def select_targets(
    model: nn.Module,
    layers: str | Sequence[str | Target] = DEFAULT_LAYERS,
    *,
    groups: str | None = None,
    cumulative: str | None = None,
) -> list[Target]:
    """What each row resets, in network order.

    Args:
        model: the model whose modules are named.
        layers: as :func:`select_layers`, or ready :class:`Target` objects (then ``groups`` must be None).
        groups: None (each layer alone), ``blocks`` (each residual block's selected layers together),
            ``stages`` (each stage's), or a YAML/JSON file mapping group names to lists of name globs.
            Selected layers outside every block or stage stay single targets; a file's groups are the only
            targets. For a transformer (a stack of blocks in a ``ModuleList``, see
            :func:`layercrit.models.blocks.find_blocks`: GPT-2, Llama/Qwen/Mistral, BERT, ViT of transformers)
            ``blocks`` are its blocks, ``attention`` and ``mlp`` their attention and MLP sub-blocks, and
            ``window:N`` every run of N consecutive blocks; each such target is the whole module (every tensor in
            it), whatever ``layers`` selects.
        cumulative: None, ``prefix`` (row k resets targets 1..k, named ``prefix:NAME_k``) or ``suffix`` (targets
            k..L, named ``suffix:NAME_k``).

    Returns:
        The targets; a single layer's target is named after the layer, a block's or stage's after its module.
    """
    if cumulative is not None and cumulative not in CUMULATIVE:
        raise LayercritError(f"cumulative={cumulative!r}: one of {', '.join(CUMULATIVE)}")
    if not isinstance(layers, str) and any(isinstance(t, Target) for t in layers):
        if groups is not None:
            raise LayercritError("layers given as Targets are already grouped: leave groups=None")
        targets = [t if isinstance(t, Target) else Target(t, [t]) for t in layers]
    elif groups is not None and (transformer := transformer_targets(model, groups)) is not None:
        targets = transformer
    else:
        names = select_layers(model, layers)
        targets = [Target(n, [n]) for n in names] if groups is None else group_layers(model, names, groups)
    return targets if cumulative is None else accumulate(targets, cumulative)


def transformer_targets(model: nn.Module, groups: str) -> list[Target] | None:
    """The block, sub-block or window targets of a transformer (see :func:`select_targets`), or None when
    ``model`` has no block stack in a ``ModuleList`` (and ``groups`` is ``blocks``: the CNN meaning applies)."""
    from ..models.blocks import find_blocks

    if groups not in ("blocks", "attention", "mlp") and not groups.startswith("window:"):
        return None
    try:
        blocks = find_blocks(model)
    except LayercritError:
        if groups == "blocks":
            return None
        raise LayercritError(f"groups={groups!r} needs a transformer (a stack of blocks in a ModuleList); this "
                             "model has none: use groups='blocks' or 'stages'") from None
    if groups == "blocks":
        return [Target(name, [name]) for name in blocks.names]
    if groups.startswith("window:"):
        size = groups.removeprefix("window:")
        if not size.isdigit() or not 1 <= int(size) <= len(blocks):
            raise LayercritError(f"groups={groups!r}: give window:N with N from 1 to the {len(blocks)} blocks")
        n = int(size)
        return [Target(f"{blocks.names[i]}+{n}", list(blocks.names[i:i + n])) for i in range(len(blocks) - n + 1)]
    targets = [Target(name, [name]) for block in blocks.names
               for name in [sub_block(model.get_submodule(block), block, groups)] if name]
    if not targets:
        raise LayercritError(f"groups={groups!r}: the blocks of this model have no {groups} sub-block that layercrit "
                             "recognises (a child whose class name holds 'Attention', or 'MLP' / named mlp, "
                             "feed_forward, ffn)")
    return targets


def sub_block(block: nn.Module, block_name: str, kind: str) -> str | None:
    """The qualified name of ``block``'s attention or MLP child, or None."""
    for child_name, child in block.named_children():
        cls = type(child).__name__.lower()
        if kind == "attention" and "attention" in cls:
            return f"{block_name}.{child_name}"
        if kind == "mlp" and ("mlp" in cls or child_name in ("mlp", "feed_forward", "ffn")):
            return f"{block_name}.{child_name}"
    return None


def group_layers(model: nn.Module, names: Sequence[str], groups: str) -> list[Target]:
    """The layers ``names`` grouped by ``blocks``, ``stages`` or a group file (see :func:`select_targets`)."""
    if groups in GROUPINGS:
        units = block_units(model, groups)
        members: dict[str, list[str]] = {}
        for name in names:
            unit = next((u for u in units if name == u or name.startswith(u + ".")), name)
            members.setdefault(unit, []).append(name)
        return [Target(unit, layers) for unit, layers in members.items()]
    path = Path(groups)
    if not path.is_file():
        raise LayercritError(f"groups={groups!r} is neither {' nor '.join(GROUPINGS)} nor a group file (YAML/JSON)")
    targets = []
    for group, patterns in _read_group_file(path).items():
        chosen = [n for n in names if any(_glob(n, p) for p in patterns)]
        if not chosen:
            raise LayercritError(f"group {group!r} of {path} matches none of the selected layers "
                                 f"(patterns {', '.join(patterns)}; check the names or layers=)")
        targets.append(Target(group, chosen))
    return targets


def block_units(model: nn.Module, level: str = "blocks") -> list[str]:
    """Names of the model's residual blocks (``level="blocks"``) or stages (``"stages"``), in network order.

    Found from the module tree, so any architecture works without a table of names: a *repeat container* is a
    module whose children named like positions (``0``, ``layer3``, ``s2``, ``encoder_layer_4``) that have
    children of their own are all of one class, at least one holding two or more weight layers (conv, linear,
    attention; norms do not count). Those children are the container's units. Blocks are the units of the
    innermost containers (no container inside them) holding two or more weight layers; stages are the units of
    the outermost containers (inside no unit). In a model with one level of repetition, such as a ViT, stages
    and blocks are the same modules.
    """
    if level not in GROUPINGS:
        raise LayercritError(f"unknown grouping {level!r}: one of {', '.join(GROUPINGS)}")
    weights: dict[str, int] = {}
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) and not isinstance(module, _NORMS):
            for prefix in _prefixes(name):
                weights[prefix] = weights.get(prefix, 0) + 1
    containers: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        kids = [(f"{name}.{n}" if name else n, c) for n, c in module.named_children()
                if _INDEXED.search(n) and any(_has_state(g) for g in c.modules() if g is not c)]
        if kids and len({type(c) for _, c in kids}) == 1 and max(weights.get(n, 0) for n, _ in kids) >= 2:
            containers[name] = [n for n, _ in kids]
    owner = {unit: name for name, kids in containers.items() for unit in kids}
    units = [name for name, _ in model.named_modules() if name in owner]  # network order
    if level == "blocks":
        return [u for u in units if weights.get(u, 0) >= 2 and not any(c == u or _inside(c, u) for c in containers)]
    return [u for u in units if not any(owner[u] == other or _inside(owner[u], other) for other in units)]


def accumulate(targets: Sequence[Target], mode: str) -> list[Target]:
    """Cumulative targets: ``prefix`` k resets targets 1..k together, ``suffix`` k resets targets k..L."""
    out = []
    for k, target in enumerate(targets):
        span = targets[: k + 1] if mode == "prefix" else targets[k:]
        modules = list(dict.fromkeys(m for t in span for m in t.modules))
        out.append(Target(f"{mode}:{target.name}", modules))
    return out


def _read_group_file(path: Path) -> dict[str, list[str]]:
    import yaml

    try:
        raw = load_json(path.read_text()) if path.suffix == ".json" else load_yaml(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        raise LayercritError(f"cannot read group file {path}: {error_text(error)}") from None
    if not isinstance(raw, dict) or not raw:
        raise LayercritError(f"group file {path} must map group names to lists of layer globs, e.g. early: [layer1.*]")
    groups = {}
    for group, patterns in raw.items():
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise LayercritError(f"group {group!r} in {path} needs a list of layer globs, e.g. [layer1.*, conv1]")
        groups[str(group)] = patterns
    return groups


def _glob(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(_short(name), pattern)


def _inside(name: str, unit: str) -> bool:
    return name.startswith(unit + ".")


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else []
