"""Reset strategies: what a layer's parameters and buffers become for one trial.

Every strategy answers one question, ``new_state(layer, module, trial) -> {tensor name: value}``, for the
module's own tensors (parameters and buffers, as in ``module.state_dict()``). The engine copies those values in
place, evaluates, and copies the trained values back, so the model is bit-identical afterwards.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from .errors import LayercritError
from .layers import Target

State = dict[str, torch.Tensor]  # one module's tensors by name
ModelState = dict[str, State]  # several modules' states by module name


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers by ``state_dict`` name (the live tensors, not copies)."""
    tensors = dict(module.named_parameters())
    tensors.update((name, buffer) for name, buffer in module.named_buffers() if buffer is not None)
    return tensors


def snapshot(module: nn.Module) -> State:
    return {name: tensor.detach().clone() for name, tensor in module_tensors(module).items()}


@torch.no_grad()
def load_in_place(module: nn.Module, state: State) -> None:
    """Copy values into the module's existing tensors (keeps their identity, device, dtype and layout)."""
    for name, tensor in module_tensors(module).items():
        if name in state:
            tensor.copy_(state[name])


def trial_seed(seed: int, trial: int) -> int:
    """A seed for (seed, trial) that is the same in every process and run."""
    return int.from_bytes(hashlib.sha256(f"layercrit:{seed}:{trial}".encode()).digest()[:4], "little")


class Reset:
    """Base class of reset strategies; subclasses set ``name`` and implement :meth:`new_state`."""

    name: ClassVar[str] = ""

    def __init__(self, *, seed: int = 0, fresh: Callable[[], nn.Module] | None = None):
        self.seed = seed
        self.fresh = fresh

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        raise NotImplementedError

    def new_states(self, model: nn.Module, target: Target, trial: int) -> ModelState:
        """The state of every module the reset of ``target`` changes (by default: each module of the target)."""
        return {name: self.new_state(name, model.get_submodule(name), trial) for name in target.modules}

    def describe(self) -> str:
        return self.name


class Rerandomize(Reset):
    """The layer's state from a fresh instance of the same architecture, built with its own init.

    Trial ``t`` builds the fresh instance under ``torch.manual_seed(trial_seed(seed, t))``, so every process
    draws the same weights. Without a factory (a bare ``nn.Module``), a copy of the model is re-initialised with
    each module's ``reset_parameters()`` (PyTorch's default init) under the same seed.
    """

    name = "rerandomize"

    def __init__(self, *, seed: int = 0, fresh: Callable[[], nn.Module] | None = None):
        super().__init__(seed=seed, fresh=fresh)
        self._template: nn.Module | None = None
        self._instances: dict[int, nn.Module] = {}

    def bind(self, model: nn.Module) -> Rerandomize:
        """Remember the trained model, used when there is no factory for fresh instances."""
        if self.fresh is None:
            self._template = model
        return self

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        fresh = self._instance(trial)
        try:
            source = fresh.get_submodule(layer)
        except AttributeError:
            raise LayercritError(f"the fresh model has no layer {layer!r}: the factory builds another architecture") from None
        state = {name: tensor.detach().clone() for name, tensor in module_tensors(source).items()}
        own = module_tensors(module)
        if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
            raise LayercritError(f"the fresh model's {layer} differs in shape from the trained one (wrong factory?)")
        return state

    def _instance(self, trial: int) -> nn.Module:
        if trial not in self._instances:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(trial_seed(self.seed, trial))
                self._instances = {trial: self._build()}  # keep one instance at a time: models can be large
        return self._instances[trial]

    def _build(self) -> nn.Module:
        if self.fresh is not None:
            return self.fresh()
        if self._template is None:
            raise LayercritError("rerandomize needs the model: call bind(model) or give a factory for fresh instances")
        fresh = copy.deepcopy(self._template).cpu()
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return fresh


class Zero(Reset):
    """All the layer's parameters set to zero; buffers (e.g. BatchNorm running statistics) untouched."""

    name = "zero"

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        return {name: torch.zeros_like(param) for name, param in module.named_parameters()}


RESETS: dict[str, type[Reset]] = {cls.name: cls for cls in (Rerandomize, Zero)}


def get_reset(name: str | Reset, **options) -> Reset:
    """A reset strategy by name (``rerandomize``, ``zero``, ...) with its options (``seed``, ``fresh``, ...)."""
    if isinstance(name, Reset):
        return name
    if name not in RESETS:
        raise LayercritError(f"unknown reset {name!r}: one of {', '.join(RESETS)}")
    return RESETS[name](**options)
