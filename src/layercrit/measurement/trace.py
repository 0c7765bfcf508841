"""One watched forward: which module ran when, on what, returning what, and (optionally) who used each tensor.

Every probe of a model's structure reads one :class:`Trace`: the engine's call structure (what prefix replay may
skip), BatchNorm folding (which convolution's output goes to which BatchNorm and nowhere else) and ``--bn``'s
consumers (which BatchNorm layers a reset module feeds). All tensors the forward touched are kept alive until the
trace is dropped, so identities (``id``, data pointers) stay unique while it is read; probe with a batch of one or
two images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


@dataclass
class Call:
    """One call of a named module: when it started and ended (one clock over all calls), its positional tensor
    arguments, its output as returned, the output's tensors and their version counters when returned."""

    name: str
    start: int
    end: int = -1
    args: tuple = ()
    output: Any = None
    outputs: tuple[torch.Tensor, ...] = ()
    versions: tuple[int, ...] = ()

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [t for t in tree_flatten(self.args)[0] if isinstance(t, torch.Tensor)]


@dataclass
class Trace:
    """The calls of one forward in the order they started, the model's output, and with ``watch_uses`` every
    tensor a torch function took as an argument, with the names of the modules running at that moment."""

    calls: list[Call]
    result: Any
    uses: list[tuple[torch.Tensor, tuple[str, ...]]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for call in self.calls:
            counts[call.name] = counts.get(call.name, 0) + 1
        return counts


class _Uses(TorchFunctionMode):
    def __init__(self, running: list[str], uses: list, quiet: list[bool]):
        super().__init__()
        self.running, self.uses, self.quiet = running, uses, quiet

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.quiet[0]:
            stack = tuple(self.running)
            self.uses += [(t, stack) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        return func(*args, **kwargs)


def trace(model: nn.Module, x: Any, *, watch_uses: bool = False,
          call: Callable[[nn.Module, Any], Any] | None = None) -> Trace:
    """Run ``model(x)`` (or ``call(model, x)``: a task's way of calling it) without gradients and record every call
    of every named submodule (see :class:`Trace`)."""
    calls: list[Call] = []
    running: list[str] = []  # the modules whose forward is running, outermost first
    open_calls: list[Call] = []
    clock = iter(range(10**9))
    uses: list = []
    quiet = [False]  # the hooks' own bookkeeping is not a use

    def pre(name):
        def hook(module, args):
            call = Call(name, next(clock), args=args)
            calls.append(call)
            open_calls.append(call)
            running.append(name)
        return hook

    def post(name):
        def hook(module, args, output):
            quiet[0] = True
            try:
                call = open_calls.pop()
                call.end, call.output = next(clock), output
                call.outputs = tuple(t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor))
                call.versions = tuple(t._version for t in call.outputs)
                running.pop()
            finally:
                quiet[0] = False
        return hook

    run = call or (lambda module, inputs: module(inputs))
    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    try:
        with torch.no_grad():
            if watch_uses:
                with _Uses(running, uses, quiet):
                    result = run(model, x)
            else:
                result = run(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return Trace(calls, result, uses)
