"""Reset strategies: what a layer's parameters and buffers become for one trial.

Every strategy answers one question, ``new_state(layer, module, trial) -> {tensor name: value}``, for the
module's own tensors (parameters and buffers, as in ``module.state_dict()``). The engine copies those values in
place, evaluates, and copies the trained values back, so the model is bit-identical afterwards.

Strategies, chosen by name (:data:`RESETS`): ``rerandomize`` (a fresh instance's init, the paper's method),
``zero``, ``reinit``/``rewind`` (an initial or earlier checkpoint), ``noise`` (Gaussian noise scaled to each
tensor's spread, or of a fixed std) and ``interpolate`` (between the trained values and any other reset's). What
happens to BatchNorm running statistics around a reset layer is a separate choice, :class:`BatchNormStats`
(``keep``, ``reset``, ``recalibrate``), that every strategy takes.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..batchnorm import recalibrate_batchnorm
from ..errors import LayercritError
from ..models.checkpoints import load_state_dict
from ..spec import split_reset
from .layers import WRAPPER_PREFIX, Target
from .tasks import ImageClassification, Task, batch_length, take
from .trace import trace

State = dict[str, torch.Tensor]  # one module's tensors by name
ModelState = dict[str, State]  # several modules' states by module name
BN_MODES = ("keep", "reset", "recalibrate")
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers by ``state_dict`` name (the live tensors, not copies)."""
    tensors = dict(module.named_parameters())
    tensors.update((name, buffer) for name, buffer in module.named_buffers() if buffer is not None)
    return tensors


def snapshot(module: nn.Module) -> State:
    return {name: tensor.detach().clone() for name, tensor in module_tensors(module).items()}


SKIP = "forward:skip"  # a state key (reset ``skip``): [1 = identity | 0 = contributes zero, outputs in a tuple]


@torch.no_grad()
def load_in_place(module: nn.Module, state: State) -> None:
    """Copy values into the module's existing tensors (keeps their identity, device, dtype and layout). A state
    holding :data:`SKIP` replaces the module's forward instead (reset ``skip``); any other state takes it back."""
    if SKIP in state:
        identity, tuple_len = (int(v) for v in state[SKIP])
        module.forward = _skipped_forward(bool(identity), tuple_len)
    elif getattr(module.__dict__.get("forward"), "skipped", False):
        del module.forward
    for name, tensor in module_tensors(module).items():
        if name in state:
            tensor.copy_(state[name])


def _skipped_forward(identity: bool, tuple_len: int) -> Callable:
    """A forward that returns its hidden-state input (a residual block made the identity) or zeros of its shape
    (a residual branch that adds nothing), in the structure the module returns (a tensor, or a tuple of
    ``tuple_len`` with the rest None: no attention weights, no cache)."""
    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        out = hidden if identity else torch.zeros_like(hidden)
        return (out, *([None] * (tuple_len - 1))) if tuple_len else out

    forward.skipped = True
    return forward


def trial_seed(seed: int, trial: int, *salt: str) -> int:
    """A seed for (seed, trial[, salt...]) that is the same in every process and run."""
    key = ":".join(["layercrit", str(seed), str(trial), *salt])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


# ---------------------------------------------------------------- BatchNorm statistics


class BatchNormStats:
    """What BatchNorm running statistics become when a target is reset.

    * ``keep`` (default; the paper's method): BatchNorm layers that are not reset keep their trained statistics;
      a reset BatchNorm layer gets what the reset gives it (``rerandomize``: the fresh instance's, mean 0 and
      variance 1; ``zero``: its trained statistics, since only parameters are zeroed).
    * ``reset``: the statistics of every reset BatchNorm layer, and of each BatchNorm layer that normalises a
      reset layer's output, go back to their initial values (mean 0, variance 1).
    * ``recalibrate``: after the reset, the statistics of every BatchNorm layer that runs at or after the
      target are re-estimated (cumulative average) on the first ``batches`` batches of the evaluation images.
    """

    def __init__(self, mode: str = "keep", batches: int | None = None):
        if mode not in BN_MODES:
            raise LayercritError(f"bn={mode!r}: one of keep, reset, recalibrate K")
        if (mode == "recalibrate") != (batches is not None):
            raise LayercritError("bn='recalibrate' needs a number of batches K (and only it), e.g. bn='recalibrate 8'")
        if batches is not None and batches < 1:
            raise LayercritError(f"bn='recalibrate {batches}': K must be at least 1 batch")
        self.mode = mode
        self.batches = batches
        self._calibration: list = []
        self._task: Task = ImageClassification()
        self._order: dict[str, int] = {}  # first call of each module in one forward
        self._consumers: dict[str, list[str]] = {}  # module -> BatchNorm layers fed by its output

    def label(self) -> str:
        """Suffix of the reset's description: empty for ``keep``."""
        return "" if self.mode == "keep" else f"+bn-{self.mode}{self.batches or ''}"

    def bind(self, model: nn.Module, images, batch_size: int, task: Task | None = None) -> None:
        """Trace the model's call order on one example; keep the calibration batches for ``recalibrate``."""
        if self.mode == "keep":
            return
        if not any(isinstance(m, _BatchNorm) for m in model.modules()):
            raise LayercritError(f"bn={self.mode!r}: the model has no BatchNorm layers (use bn='keep')")
        n = 0 if images is None else batch_length(images)
        if not n:
            raise LayercritError(f"bn={self.mode!r} needs the evaluation images to trace the model")
        self._task = task or self._task
        self._calibration = [take(images, slice(i, i + batch_size))
                             for i in range(0, (self.batches or 1) * batch_size, batch_size) if i < n]
        self._trace(model, take(images, slice(0, 1)))

    def adjust(self, model: nn.Module, target: Target, states: ModelState) -> ModelState:
        """``states`` (the target's reset) plus the BatchNorm statistics this mode sets."""
        if self.mode == "reset":
            for name in [*target.modules, *(c for m in target.modules for c in self._consumers.get(m, []))]:
                if isinstance(model.get_submodule(name), _BatchNorm):
                    states.setdefault(name, {}).update(_initial_stats(model.get_submodule(name)))
        elif self.mode == "recalibrate":
            for name, stats in self._recalibrated(model, target, states).items():
                states.setdefault(name, {}).update(stats)
        return states

    def _recalibrated(self, model: nn.Module, target: Target, states: ModelState) -> ModelState:
        start = min(self._first_call(name) for name in target.modules)
        names = [n for n, m in model.named_modules()
                 if isinstance(m, _BatchNorm) and m.track_running_stats and self._order.get(n, -1) >= start]
        layers = {n: model.get_submodule(n) for n in names}
        saved = {n: snapshot(model.get_submodule(n)) for n in {*states, *names}}
        try:
            for name, state in states.items():
                load_in_place(model.get_submodule(name), state)
            task, device = self._task, next(model.parameters()).device
            recalibrate_batchnorm(model, layers.values(), self._calibration,
                                  lambda batch: task.call(model, task.inputs(batch, device)))
            return {n: {k: getattr(bn, k).detach().clone() for k in _BN_STATS} for n, bn in layers.items()}
        finally:
            for name, state in saved.items():
                load_in_place(model.get_submodule(name), state)

    def _first_call(self, name: str) -> int:
        """When the module (or, if it is never called itself, its nearest called ancestor) first runs."""
        while name and name not in self._order:
            name = name.rpartition(".")[0]
        return self._order.get(name, 0)

    def _trace(self, model: nn.Module, example) -> None:
        x = self._task.inputs(example, next(model.parameters()).device)
        watched = trace(model, x, call=self._task.call)
        order: dict[str, int] = {}
        for call in watched.calls:  # in order of starting
            order.setdefault(call.name, len(order))
        outputs: dict[int, str] = {}  # data pointer -> the first module to return it (inner before outer)
        for call in sorted(watched.calls, key=lambda c: c.end):
            if isinstance(call.output, torch.Tensor):
                outputs.setdefault(call.output.data_ptr(), call.name)
        self._order = order
        self._consumers = {}
        for call in watched.calls:
            first = call.args[0] if call.args else None
            if isinstance(model.get_submodule(call.name), _BatchNorm) and isinstance(first, torch.Tensor):
                source = outputs.get(first.data_ptr())
                if source is not None and source != call.name:
                    self._consumers.setdefault(source, []).append(call.name)


def _initial_stats(bn: _BatchNorm) -> State:
    return {name: torch.ones_like(t) if name == "running_var" else torch.zeros_like(t)
            for name, t in module_tensors(bn).items() if name in _BN_STATS}


# ---------------------------------------------------------------- strategies


class Reset:
    """Base class of reset strategies; subclasses set ``name`` and implement :meth:`new_state`.

    Args (every strategy's):
        seed: seeds the random resets, with the trial (see :func:`trial_seed`).
        fresh: factory for fresh instances of the architecture (``rerandomize``).
        bn: BatchNorm statistics around the target: ``keep``, ``reset``, ``recalibrate`` (see
            :class:`BatchNormStats`); ``bn_batches``: K for ``recalibrate``.
    """

    name: ClassVar[str] = ""

    def __init__(self, *, seed: int = 0, fresh: Callable[[], nn.Module] | None = None, bn: str = "keep",
                 bn_batches: int | None = None):
        self.seed = seed
        self.fresh = fresh
        self.bn = BatchNormStats(bn, bn_batches)

    def bind(self, model: nn.Module, images=None, batch_size: int = 100, task: Task | None = None) -> Reset:
        """Prepare to reset layers of the trained ``model``; ``images`` (the evaluation inputs, as ``task`` takes
        them) serve ``bn`` (tracing, recalibration)."""
        self.bn.bind(model, images, batch_size, task)
        return self

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        raise NotImplementedError

    def new_states(self, model: nn.Module, target: Target, trial: int) -> ModelState:
        """The state of every module the reset of ``target`` changes: each module of the target, plus the
        BatchNorm statistics that ``bn`` sets."""
        states = {name: self.new_state(name, model.get_submodule(name), trial) for name in target.modules}
        return self.bn.adjust(model, target, states)

    def variants(self) -> list[tuple[dict[str, float], Reset]]:
        """The single resets this one stands for, with the columns that tell their rows apart (``interpolate``
        over several α gives one per α)."""
        return [({}, self)]

    def label(self) -> str:
        return self.name

    def describe(self) -> str:
        """The ``reset`` column of this strategy's rows: its name and options, e.g. ``noise(scale=0.1)``."""
        return self.label() + self.bn.label()


class Rerandomize(Reset):
    """The layer's state from a fresh instance of the same architecture, built with its own init.

    Trial ``t`` builds the fresh instance under ``torch.manual_seed(trial_seed(seed, t))``, so every process
    draws the same weights. Without a factory (a bare ``nn.Module``), a copy of the model is re-initialised with
    each module's ``reset_parameters()`` (PyTorch's default init) under the same seed.
    """

    name = "rerandomize"

    def __init__(self, *, seed: int = 0, fresh: Callable[[], nn.Module] | None = None, bn: str = "keep",
                 bn_batches: int | None = None):
        super().__init__(seed=seed, fresh=fresh, bn=bn, bn_batches=bn_batches)
        self._template: nn.Module | None = None
        self._instances: dict[int, nn.Module] = {}

    def bind(self, model: nn.Module, images=None, batch_size: int = 100, task: Task | None = None) -> Rerandomize:
        """Also remember the trained model, used when there is no factory for fresh instances."""
        if self.fresh is None:
            self._template = model
        super().bind(model, images, batch_size, task)
        return self

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        if self.fresh is None and _is_transformers_model(self._template):
            return self._initialised_copy(layer, module, trial)
        fresh = self._instance(trial)
        try:
            source = fresh.get_submodule(layer)
        except AttributeError:
            raise LayercritError(f"the fresh model has no layer {layer!r}: the factory builds another architecture") from None
        # Not cloned: the fresh instance is dropped for the next trial, and targets sharing a module (groups,
        # cumulative) then share one copy of its tensors.
        state = {name: tensor.detach() for name, tensor in module_tensors(source).items()}
        own = module_tensors(module)
        if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
            raise LayercritError(f"the fresh model's {layer} differs in shape from the trained one (wrong factory?)")
        return state

    def _initialised_copy(self, layer: str, module: nn.Module, trial: int) -> State:
        """A transformers model (its ``_init_weights``) without a factory: a copy of the target module alone, given
        the architecture's own init under the seed of (seed, trial, layer); no model instance is built, so a
        trial costs the target's parameters, not the model's."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(trial_seed(self.seed, trial, layer))
            fresh = copy.deepcopy(module)
            with torch.no_grad():
                for part in fresh.modules():
                    self._template._init_weights(part)
        return {name: tensor.detach() for name, tensor in module_tensors(fresh).items()}

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


def _is_transformers_model(model: nn.Module | None) -> bool:
    """A transformers ``PreTrainedModel`` (checked without importing transformers: a model of it imported it)."""
    module = sys.modules.get("transformers")
    return module is not None and isinstance(model, module.PreTrainedModel)


class Zero(Reset):
    """All the layer's parameters set to zero; buffers (e.g. BatchNorm running statistics) untouched."""

    name = "zero"

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        # A broadcast zero: no memory per target, however many targets share the module.
        return {name: torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p)
                for name, p in module.named_parameters()}


class Rewind(Reset):
    """The layer's state in an earlier checkpoint of the same model (``rewind(checkpoint=CKPT)``, or ``--to CKPT``).

    The checkpoint is read with :func:`layercrit.models.load_state_dict`; its keys may or may not carry the
    normalising wrapper's ``model.`` prefix. Every persistent tensor of a reset layer must be in it, with the
    trained shape. The state is the same in every trial, so the engine computes each layer once.
    """

    name = "rewind"

    def __init__(self, *, checkpoint: str | Path | None = None, trust_checkpoint: bool = False, seed: int = 0,
                 fresh: Callable[[], nn.Module] | None = None, bn: str = "keep", bn_batches: int | None = None):
        super().__init__(seed=seed, fresh=fresh, bn=bn, bn_batches=bn_batches)
        if checkpoint is None:
            flag = "--init" if self.name == "reinit" else "--to"
            raise LayercritError(f"reset {self.name!r} needs a checkpoint: {self.name} {flag} CKPT (checkpoint=...)")
        self.checkpoint = Path(checkpoint)
        self.tensors = load_state_dict(self.checkpoint, trust_checkpoint=trust_checkpoint)

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        keys = module.state_dict(keep_vars=True).keys()
        prefixes = [f"{layer}.", f"{layer.removeprefix(WRAPPER_PREFIX)}."]
        prefix = next((p for p in prefixes if any(k.startswith(p) for k in self.tensors)), prefixes[-1])
        missing = [k for k in keys if prefix + k not in self.tensors]
        if missing:
            raise LayercritError(f"checkpoint {self.checkpoint} has no {prefix}{missing[0]} for layer {layer}: "
                                 "give a checkpoint of the same architecture")
        own = module_tensors(module)
        state = {k: self.tensors[prefix + k] for k in keys}
        wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
        if wrong:
            raise LayercritError(f"checkpoint {self.checkpoint} has {prefix}{wrong[0]} of shape "
                                 f"{tuple(state[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}")
        return state

    def label(self) -> str:
        return f"{self.name}({self.checkpoint.name})"


class Reinit(Rewind):
    """The layer back to its weights in the initial checkpoint (Zhang, Bengio & Singer 2019, "re-initialization")."""

    name = "reinit"


class Noise(Reset):
    """Gaussian noise added to the layer's parameters (buffers untouched).

    Give ``scale`` s for noise of std s × each parameter tensor's own std (population std of its trained
    values), or ``sigma`` for a fixed std. The noise is added to the trained values, or to ``base``'s state when
    a base reset is given. Each (seed, trial, layer, tensor) draws its own noise, the same in every process.
    """

    name = "noise"

    def __init__(self, *, scale: float | None = None, sigma: float | None = None, base: str | Reset | None = None,
                 seed: int = 0, fresh: Callable[[], nn.Module] | None = None, bn: str = "keep",
                 bn_batches: int | None = None, **base_options):
        super().__init__(seed=seed, fresh=fresh, bn=bn, bn_batches=bn_batches)
        if (scale is None) == (sigma is None):
            raise LayercritError("reset 'noise' needs either a relative scale or an absolute sigma: noise(scale=S) "
                                 "or noise(sigma=S)")
        if (scale if scale is not None else sigma) < 0:
            raise LayercritError(f"scale={scale if scale is not None else sigma}: the noise's size must be >= 0")
        self.scale, self.sigma = scale, sigma
        self.base = None if base is None else get_reset(base, seed=seed, fresh=fresh, **base_options)
        if self.base is None and base_options:
            raise LayercritError(f"reset 'noise' takes {', '.join(base_options)} only with a base= reset")

    def bind(self, model: nn.Module, images=None, batch_size: int = 100, task: Task | None = None) -> Noise:
        if self.base is not None:
            self.base.bind(model)
        super().bind(model, images, batch_size, task)
        return self

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        params = dict(module.named_parameters())
        start = self.base.new_state(layer, module, trial) if self.base is not None else {}
        state = dict(start)
        for name, param in params.items():
            value = start.get(name, param.detach())
            spread = float(param.detach().float().std(correction=0))
            std = self.sigma if self.sigma is not None else self.scale * spread
            generator = torch.Generator().manual_seed(trial_seed(self.seed, trial, layer, name))
            noise = torch.randn(value.shape, generator=generator).to(value.device, value.dtype)
            state[name] = value + std * noise
        return state

    def label(self) -> str:
        amount = f"scale={self.scale:g}" if self.scale is not None else f"sigma={self.sigma:g}"
        return f"noise({self.base.label() + ',' if self.base is not None else ''}{amount})"


class Interpolate(Reset):
    """θ = (1 − α)·θ_trained + α·θ_base, for a ``base`` reset (default ``rerandomize``) and α in [0, 1].

    ``alpha`` may be a list: the reset then stands for one reset per α (see :meth:`variants`), and each row
    carries its ``alpha``. Integer buffers (``num_batches_tracked``) take the base's value only at α = 1.
    """

    name = "interpolate"

    def __init__(self, *, alpha: float | Sequence[float] | None = None, base: str | Reset = "rerandomize",
                 seed: int = 0, fresh: Callable[[], nn.Module] | None = None, bn: str = "keep",
                 bn_batches: int | None = None, **base_options):
        super().__init__(seed=seed, fresh=fresh, bn=bn, bn_batches=bn_batches)
        alphas = [alpha] if isinstance(alpha, int | float) else list(alpha or [])
        if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
            raise LayercritError(f"alpha={alpha!r}: reset 'interpolate' needs alphas a[,a2,...] with every a in [0, 1]")
        self.alphas = [float(a) for a in alphas]
        self.base = get_reset(base, seed=seed, fresh=fresh, **base_options)

    def bind(self, model: nn.Module, images=None, batch_size: int = 100, task: Task | None = None) -> Interpolate:
        self.base.bind(model)
        super().bind(model, images, batch_size, task)
        return self

    def variants(self) -> list[tuple[dict[str, float], Reset]]:
        out = []
        for alpha in self.alphas:
            single = copy.copy(self)  # shares the base (and its fresh instances) and the traced BatchNorm policy
            single.alphas = [alpha]
            out.append(({"alpha": alpha}, single))
        return out

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        if len(self.alphas) != 1:
            raise LayercritError("interpolate over several alphas: run each of variants() (measure() does)")
        alpha = self.alphas[0]
        trained = module_tensors(module)
        state = {}
        for name, value in self.base.new_state(layer, module, trial).items():
            own = trained[name].detach()
            if own.is_floating_point():
                state[name] = torch.lerp(own, value.to(own.device, own.dtype), alpha)
            else:
                state[name] = value if alpha == 1.0 else own.clone()
        return state

    def label(self) -> str:
        return f"interpolate({self.base.label()},alpha={'|'.join(f'{a:g}' for a in self.alphas)})"


class Skip(Reset):
    """The depth-pruning intervention: a residual block becomes the identity (its output is its input), and an
    attention or MLP sub-block adds nothing to the residual stream (its output is zero). For transformer targets
    (``groups`` ``blocks``, ``attention``, ``mlp``, ``window:N``); no tensor changes. Exactly the model with the
    block removed for pre-LN blocks (GPT-2, Llama-style); for post-LN blocks (BERT) removing a sub-block is not a
    zero output, and ``skip`` of a block is still the block removed."""

    name = "skip"

    def bind(self, model: nn.Module, images=None, batch_size: int = 100, task: Task | None = None) -> Skip:
        from ..models.blocks import find_blocks

        super().bind(model, images, batch_size, task)
        try:
            self._blocks = set(find_blocks(model).names)
        except LayercritError:
            self._blocks = set()
        self._sub_blocks = {name for name, _ in model.named_modules()
                            if name.rpartition(".")[0] in self._blocks}
        self._tuples: dict[str, int] = {}
        if images is not None:  # how each block and sub-block returns its output: a tensor or a tuple
            task = task or ImageClassification()
            example = task.inputs(take(images, slice(0, min(2, batch_length(images)))),
                                  next(model.parameters()).device)
            for called in trace(model, example, call=task.call).calls:
                if called.name in self._blocks or called.name in self._sub_blocks:
                    self._tuples[called.name] = len(called.output) if isinstance(called.output, tuple) else 0
        return self

    def new_states(self, model: nn.Module, target: Target, trial: int) -> ModelState:
        blocks = getattr(self, "_blocks", None)
        if blocks is None:
            raise LayercritError("reset skip needs the model: call bind(model, images) first")
        states = {}
        for name in target.modules:
            if name not in blocks and name not in self._sub_blocks:
                raise LayercritError(f"reset skip removes transformer blocks and their attention / MLP sub-blocks, "
                                     f"not {name!r}: use groups='blocks', 'attention', 'mlp' or 'window:N'")
            states[name] = {SKIP: torch.tensor([name in blocks, self._tuples.get(name, 0)])}
        return states


RESETS: dict[str, type[Reset]] = {cls.name: cls for cls in (Rerandomize, Zero, Reinit, Rewind, Noise, Interpolate,
                                                            Skip)}


# Every strategy's, set by measure(), not written in a reset's text (trust_checkpoint comes from the caller alone:
# a config file must not let a checkpoint run code).
COMMON_OPTIONS = ("self", "seed", "fresh", "bn", "bn_batches", "trust_checkpoint")


def declared_options(name: str) -> dict[str, str]:
    """The options reset ``name`` declares (its keyword arguments beyond :data:`COMMON_OPTIONS`), each with what it
    takes: ``declared_options("noise") == {"scale": "a number", "sigma": "a number", "base": "a reset"}``."""
    cls = RESETS[name]
    hints = typing.get_type_hints(cls.__init__)
    return {key: _type_name(hints.get(key)) for key, p in inspect.signature(cls.__init__).parameters.items()
            if key not in COMMON_OPTIONS and p.kind is p.KEYWORD_ONLY}


def get_reset(name: str | Reset, **options) -> Reset:
    """A reset strategy by name (one of :data:`RESETS`) or by ``NAME(OPTION=VALUE,...)`` text, with its options
    (``seed``, ``fresh``, ``scale``, ...).

    A strategy declares its options once, as the keyword arguments of its ``__init__`` with their types; options
    written in the text are converted to those types (``noise(scale=0.1)``; a list of numbers as ``0.25|0.5``).
    Options a strategy does not take are an error, except ``seed`` and ``fresh``, which every strategy accepts.
    """
    if isinstance(name, Reset):
        return name
    name, written = split_reset(name)
    if name not in RESETS:
        raise LayercritError(f"unknown reset {name!r}: one of {', '.join(RESETS)}")
    cls = RESETS[name]
    parameters = inspect.signature(cls.__init__).parameters
    declared = declared_options(name)
    # a reset with a base (noise, interpolate) hands the options it does not declare on to that base; without one
    # they are unknown here
    base = written.get("base", options.get("base", getattr(parameters.get("base"), "default", None)))
    passes_on = any(p.kind is p.VAR_KEYWORD for p in parameters.values()) and base not in (None, inspect.Parameter.empty)
    unknown = [k for k in [*written, *options] if k not in parameters and not passes_on]
    unknown = [k for k in written if k in COMMON_OPTIONS] or unknown
    if unknown:
        raise LayercritError(f"reset {name!r} takes no option {unknown[0]!r} "
                             f"(its options: {', '.join(declared) or 'none'})")
    hints = typing.get_type_hints(cls.__init__)
    converted = {key: _convert(value, hints.get(key), f"{name}({key}={value})") for key, value in written.items()}
    return cls(**{**options, **converted})


def _kinds(hint) -> set:
    """The types a type hint allows (``float | None`` -> {float}; ``None`` for no hint -> {})."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return set(typing.get_args(hint) if union else (hint,)) - {type(None), None}


def _convert(text: str, hint, where: str):
    """Option text -> the declared type: a finite number, a list of them (``0.25|0.5``), a bool, or the text."""
    kinds = _kinds(hint)
    lists = [k for k in kinds if typing.get_origin(k) in (Sequence, list, tuple)]
    try:
        if lists and "|" in text:
            return [_number(typing.get_args(lists[0])[0], v) for v in text.split("|")]
        if bool in kinds:
            if text not in ("true", "false"):
                raise ValueError(text)
            return text == "true"
        for kind in (int, float):
            if kind in kinds:
                return _number(kind, text)
    except ValueError:
        raise LayercritError(f"reset {where}: give {_type_name(hint)}") from None
    return text


def _number(kind: type, text: str):
    value = kind(text)
    if not math.isfinite(value):  # nan or inf would reset a layer to non-finite values
        raise ValueError(text)
    return value


def _type_name(hint) -> str:
    """What an option of type ``hint`` takes, in words."""
    kinds = _kinds(hint)
    if any(typing.get_origin(k) in (Sequence, list, tuple) for k in kinds):
        return "a number or numbers separated by |"
    if Reset in kinds or "Reset" in str(hint):
        return "a reset"
    if Path in kinds:
        return "a file"
    return {bool: "true or false", int: "a whole number", float: "a number"}.get(next(iter(kinds), None), "text")
