"""Checkpoint files: reading a state dict (weights-only unless trusted), strict loading with readable errors."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import LayercritError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def looks_like_checkpoint(spec: str) -> bool:
    return spec.endswith(CHECKPOINT_SUFFIXES) or os.path.isfile(spec)


def load_state_dict(path: str | Path, *, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict: unwraps ``state_dict``/``model``/... and strips ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise LayercritError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error here
        # torch's weights-only unpickler met a Python object: "Unsupported global: GLOBAL x.y", or for a module
        # it blocks outright (posix, os, subprocess) "unsupported GLOBAL posix.system whose module ..."
        found = re.search(r"unsupported global\W*(?:GLOBAL )?([\w.]+)", str(error), re.IGNORECASE)
        if found:
            raise LayercritError(f"checkpoint {path} holds pickled Python objects besides its weights "
                                 f"({found.group(1)}): pass --trust-checkpoint if you trust its source") from error
        raise LayercritError(f"cannot read checkpoint {path}: not a PyTorch or safetensors file, or corrupt "
                             f"({type(error).__name__})") from error
    for key in _STATE_DICT_KEYS:
        while isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping | nn.Module):
            state = state[key]
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LayercritError(f"checkpoint {path} holds no state dict of tensors")
    prefix = "module."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def infer_head_and_stem(probe: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """Number of classes and input channels as the checkpoint has them (its last Linear, its first conv)."""
    linears = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)]
    classes = chans = None
    if linears and f"{linears[-1]}.weight" in state:
        classes = int(state[f"{linears[-1]}.weight"].shape[0])
    if convs and f"{convs[0]}.weight" in state:
        chans = int(state[f"{convs[0]}.weight"].shape[1])
    return classes, chans


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load every key or fail with a message listing what is missing, unexpected or of the wrong shape."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label}: {', '.join(keys[:4])}{more}")
        raise LayercritError(
            f"checkpoint {source} does not match the architecture: {'; '.join(parts)} "
            "(check --arch, or remap the keys)"
        )
    module.load_state_dict(state, strict=True)

