"""The residual blocks of a transformer, and a copy of the model without some of them.

:func:`find_blocks` finds the stack of decoder/encoder blocks of common Hugging Face architectures (GPT-2's
``transformer.h``, Llama/Qwen/Mistral's ``model.layers``, BERT's and ViT's ``encoder.layer``) without a table of
names: it is the ``nn.ModuleList`` of at least two modules of one class that holds the most parameters.
:func:`drop_blocks` removes blocks from it and updates the config (the layer count, per-layer lists such as
``layer_types``) and the blocks' own layer indices (used by the key-value cache), so ``save_pretrained`` writes a
model transformers loads as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import LayercritError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Blocks:
    """The block stack of a model: the ModuleList's qualified name and each block's qualified name, in order."""

    container: str
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def find_blocks(model: nn.Module) -> Blocks:
    """The residual block stack of ``model`` (see the module docstring); raises when there is none."""
    best, best_params = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = (name, module), params
    if best is None:
        raise LayercritError(f"{type(model).__name__} has no stack of transformer blocks (a ModuleList of at least "
                             "two blocks of one class)")
    name, module = best
    prefix = f"{name}." if name else ""
    return Blocks(container=name, names=tuple(f"{prefix}{i}" for i in range(len(module))))


def parse_blocks(text: str | Sequence[int], n_blocks: int) -> list[int]:
    """Block indices from ``"3,5"`` or ``"2-4"`` (inclusive ranges, negative counts from the end), sorted; a block
    named twice is refused (a typo, as ``1,1`` for ``1,2``, would otherwise drop fewer blocks than meant)."""
    if not isinstance(text, str):
        items = [int(i) for i in text]
    else:
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, dash, high = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                items.extend(range(int(low), int(high) + 1) if dash else [int(low)])
            except ValueError:
                raise LayercritError(f"drop={text!r}: give block indices like 3,5 or 2-4") from None
    normalised = [i % n_blocks if -n_blocks <= i < 0 else i for i in items]
    twice = sorted({i for i in normalised if normalised.count(i) > 1})
    if twice:
        raise LayercritError(f"drop={text!r} names block {twice[0]} twice: name each block once")
    indices = sorted(set(normalised))
    if not indices:
        raise LayercritError("drop: name at least one block")
    bad = [i for i in indices if not 0 <= i < n_blocks]
    if bad:
        raise LayercritError(f"drop={text!r}: the model has blocks 0-{n_blocks - 1}, not {bad[0]}")
    if len(indices) == n_blocks:
        raise LayercritError(f"drop={text!r} would remove all {n_blocks} blocks: keep at least one")
    return indices


def drop_blocks(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Remove blocks ``drop`` (indices into :func:`find_blocks`) from ``model`` in place and return it."""
    blocks = find_blocks(model)
    stack: nn.ModuleList = model.get_submodule(blocks.container)
    keep = [block for i, block in enumerate(stack) if i not in set(drop)]
    for new_index, block in enumerate(keep):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent_name, _, attr = blocks.container.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, nn.ModuleList(keep))
    config = getattr(model, "config", None)
    if config is not None:
        for key in LAYER_COUNT_KEYS:
            if key in config.to_dict():
                setattr(config, key, len(keep))
        for key, value in config.to_dict().items():
            if "layer" in key and isinstance(value, list) and len(value) == len(stack):  # e.g. layer_types
                setattr(config, key, [v for i, v in enumerate(value) if i not in set(drop)])
    return model
