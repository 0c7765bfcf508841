"""The engine: evaluate the model with one layer reset at a time and accumulate metrics per (layer, trial).

Two paths, same numbers:

* ``naive`` — the paper's method and our test oracle: for every (layer, trial), reset the layer, run a full forward
  over every batch (re-decoding images from their source when it can), restore the layer.
* ``fast`` (default) — batch-outer. For each batch of the decoded-once evaluation set: one clean forward that
  records the outputs of the modules that finish before each reset layer starts; then for every (layer, trial)
  a forward in which those modules return their recorded outputs instead of computing (the *prefix replay*), so
  only the part of the network from the reset layer on is computed. The kernels that do run are the same as in
  the naive path, on the same inputs, so results are identical, not just close.

By default the fast engine also runs convolutions in NHWC layout and folds each eval-mode BatchNorm into the
convolution before it (:mod:`layercrit.measurement.folding`); both change fp32 results in the last bits only. With both off
(``--exact``), the fast engine's results equal the naive engine's bit for bit.

Prefix replay works on the eager model, so it needs no tracing and handles any architecture. A module is
replayed only when it is safe: called exactly once per forward, finished before the reset layer (or its nearest
called ancestor) started, and its output does not alias its input (views, Identity; in-place activations are
switched to out of place for the run). Layers whose parameters are shared with another module run full forwards.
Recorded outputs are replayed without copying unless something changes them in place; version counters catch
any such change, and the chunk is then redone with copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .. import spec
from ..data import EvalSet
from ..errors import LayercritError
from .folding import find_pairs, folded_batchnorm, patched_forwards
from .layers import Target
from .metrics import PredictionMetrics, Reference
from .resets import ModelState, Reset, load_in_place, snapshot
from .tasks import ImageClassification, Task, batch_length, take
from .trace import trace

log = logging.getLogger(__name__)

PRECISIONS = dict(zip(spec.PRECISIONS, (None, torch.bfloat16, torch.float16), strict=True))
ENGINES = spec.ENGINES


@dataclass
class EngineOptions:
    """How to run the evaluations; none of these change the numbers in fp32 (except ``precision``)."""

    engine: str = "fast"
    batch_size: int = 100
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool | None = None  # None: on for the fast engine, off for the naive one
    fold_bn: bool | None = None  # None: on for the fast engine (without --compile), off for the naive one
    max_cache_mb: float = 4096.0
    compile: bool = False
    progress: bool = True
    image_target_ci: float | None = None  # stop a unit's images once criticality and top-1 are known to ± this
    # called with (layer or None for the unmodified model, trial, positions, logits) after every evaluated batch
    on_logits: Callable[[str | None, int, slice, torch.Tensor], None] | None = None
    ci_alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise LayercritError(f"unknown engine {self.engine!r}: one of {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise LayercritError(f"unknown precision {self.precision!r}: one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1:
            raise LayercritError(f"batch_size={self.batch_size}: give at least 1")
        if self.image_target_ci is not None and not 0 < self.image_target_ci < 1:
            raise LayercritError("image_target_ci is a half-width as a fraction, e.g. 0.01 (one point of top-1)")


@dataclass
class Unit:
    """One row to produce: ``layer`` reset with ``trial``'s state (``layer=None``: the unmodified model).

    A reset that gives the same state in several trials is computed once: the later trials' units share the
    first one's metrics and say so in ``computed_in_trial``.
    """

    layer: str | None
    trial: int
    computed_in_trial: int
    metrics: PredictionMetrics = field(default_factory=PredictionMetrics)


def run(
    model: nn.Module,
    evalset: EvalSet,
    layers: Sequence[str | Target],
    reset: Reset,
    trials: Sequence[int],
    options: EngineOptions,
    on_chunk: Callable[[list[dict]], None] | None = None,
    memo: dict | None = None,
    task: Task | None = None,
) -> list[dict]:
    """Evaluate the unmodified model and every (layer, trial); return one row dict per unit, original first.

    ``layers`` are module names or :class:`~layercrit.measurement.layers.Target` groups of modules reset together.
    ``task`` (:mod:`layercrit.measurement.tasks`; default image classification) says what a batch of ``evalset``
    is, how the model is called and which of its outputs are compared.

    ``on_chunk`` receives the rows finished so far (original row included) after every chunk of layers, so a
    caller can persist them. ``memo``: a dict the caller keeps between calls on the same model and input size
    (the sequential design's many small calls, a sweep worker's units), where what the engine learns is kept: the
    model's call structure and the BatchNorm pairs to fold (probed once), and the batch size that fits in memory.
    """
    device = torch.device(options.device)
    model = model.eval().to(device)
    if options.precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("this CPU has no native bf16: --precision bf16 will be slower than fp32 here")
    # NHWC convolutions are faster on CPUs (oneDNN) and GPUs alike; they change fp32 results only in the last bits,
    # so the naive engine (the paper's method, our oracle) keeps PyTorch's default NCHW layout unless asked.
    channels_last = _channels_last(options)
    with _memory_format(model, channels_last):  # the caller's model is left in the layout it came in
        return _run(model, evalset, layers, reset, trials, options, on_chunk, device, channels_last,
                    {} if memo is None else memo, task or ImageClassification())


def _run(model, evalset, layers, reset, trials, options, on_chunk, device, channels_last, memo, task) -> list[dict]:
    forward = torch.compile(model) if options.compile else model
    evaluator = _Evaluator(model, forward, evalset, options, device, channels_last, memo, task)
    # Folding eval-mode BatchNorm into the convolution before it, like NHWC, changes fp32 results in the last bits
    # only; --compile does its own rewriting, and the naive engine stays the paper's method unless asked.
    fold_bn = options.fold_bn if options.fold_bn is not None else options.engine == "fast" and not options.compile

    original = Unit(layer=None, trial=0, computed_in_trial=0)
    targets = [t if isinstance(t, Target) else Target(t, [t]) for t in layers]
    plans = _plan_units(model, targets, reset, trials, alpha=options.ci_alpha if options.image_target_ci else None)
    n_computed = sum(len(plan.computed) for plan in plans)
    if fold_bn and "pairs" not in memo:
        memo["pairs"] = find_pairs(model, evaluator.sample(), call=task.call)  # after planning (recalibration)
    evaluator.pairs = memo["pairs"] if fold_bn else []
    replay = options.engine == "fast" and not options.compile
    with _progress(options.progress, n_computed, len(evalset), options.batch_size) as bar, \
            folded_batchnorm(model, evaluator.pairs), _out_of_place(model, enabled=replay):
        if not replay:
            chunks: Iterator[list[LayerPlan]] = ([plan] for plan in plans)
            step = evaluator.naive_chunk
        else:
            chunks = evaluator.chunk(plans)
            step = evaluator.replay_chunk
        rows: list[dict] = []
        for chunk in chunks:
            while True:
                first = not evaluator.original_done
                try:
                    step(chunk, original, bar)
                    break
                except _RecordChanged as changed:
                    # A recorded output was modified in place after all: copy it from now on, redo the chunk.
                    log.info("%s: its output is changed in place downstream; replaying copies of it", changed)
                    evaluator.structure.mutated |= changed.names
                except Exception as error:
                    # Auto-tune to memory: halve the batch and redo the chunk from scratch.
                    if not out_of_memory(error) or evaluator.options.batch_size == 1:
                        raise
                    memo["batch_size"] = evaluator.options.batch_size // 2
                    evaluator.options = replace(evaluator.options, batch_size=memo["batch_size"])
                    log.warning("out of memory: batch size down to %d", evaluator.options.batch_size)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                # Reached only after one of those: redo the chunk from scratch.
                alpha = options.ci_alpha if options.image_target_ci else None
                for plan in chunk:
                    plan.fresh_metrics(alpha)
                if first:
                    evaluator.clean, original.metrics = None, PredictionMetrics()
                    evaluator.original_done = False
            _refuse_nonfinite(original)
            rows += [_row(u, original) for plan in chunk for u in plan.units]
            if on_chunk is not None:
                on_chunk([_row(original, original), *rows])
        if not plans:
            evaluator.clean_only(original, bar)
            _refuse_nonfinite(original)
    return [_row(original, original), *rows]


def _refuse_nonfinite(original: Unit) -> None:
    """Every row compares against the unmodified model's outputs: when those are not finite (broken weights),
    nothing measured means anything. Checked on the first chunk's clean pass, before any row is handed out."""
    broken = original.metrics.n - original.metrics.n_finite
    if broken:
        raise LayercritError(f"the unmodified model gives non-finite outputs for {broken} of {original.metrics.n} "
                             "images (broken weights?)")


def default_batch_size(device: str | None) -> int:
    """Images per forward unless given: the paper's 500 on a GPU (halved while out of memory), 100 on the CPU."""
    on_gpu = device.startswith("cuda") if device else torch.cuda.is_available()
    return 500 if on_gpu else 100


def check_device(device: str | None, name: str = "device") -> str:
    """``device``, or cuda when available and else cpu; a device this machine lacks is refused, naming those it has."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:  # not a device string at all, e.g. "tpu7"
        parsed = None
    if parsed is None or not _present(parsed):
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        mps = ["mps"] if torch.backends.mps.is_available() else []
        raise LayercritError(f"{name} {device!r} is not available on this machine: use one of "
                             f"{', '.join(['cpu', *gpus, *mps])}")
    return device


def _present(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if backend is None or not hasattr(backend, "device_count") or not backend.device_count():
        return False
    return device.index is None or device.index < backend.device_count()


def out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's MemoryError / RuntimeError("... not enough memory"): the one
    test of the out-of-memory policy (halve the batch, redo), here and in sweep workers."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("not enough memory" in text or "out of memory" in text)


_allocator_tuned = False


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of returning it to the system.

    By default glibc serves every allocation above 128 KB-32 MB (a batch's activations) with a fresh ``mmap`` and
    unmaps it on free, so each forward page-faults all its tensors in again: on the 2-core VM of BENCHMARKS.md that
    was about half the time of a ResNet-50 forward on the CPU (3.7 s → 2.0 s per batch of 32), for either engine.
    Resident memory then stays at its peak. It changes the whole process, so a library call never does it: the
    command line and sweep workers (processes layercrit owns) call it, a notebook may opt in.
    ``LAYERCRIT_MALLOC=default`` keeps glibc's defaults.
    """
    global _allocator_tuned
    if _allocator_tuned or os.environ.get("LAYERCRIT_MALLOC") == "default":
        return
    _allocator_tuned = True
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 2**30)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    log.debug("glibc malloc: large blocks from the heap, freed memory kept")


# ---------------------------------------------------------------- planning


@dataclass
class LayerPlan:
    """A target's trained state, the reset state and unit of each trial to compute, and all its units.

    States are keyed by module name: a target may span several modules (a block, a stage), and a reset may
    change modules outside the target (e.g. BatchNorm statistics re-estimated after the reset).
    """

    target: Target
    trained: ModelState
    computed: list[tuple[ModelState, Unit]]
    units: list[Unit]
    replayed: list[str] = field(default_factory=list)  # modules replayed from the clean forward (fast engine)

    def apply(self, model: nn.Module, state: ModelState) -> None:
        for name, module_state in state.items():
            load_in_place(model.get_submodule(name), module_state)

    def restore(self, model: nn.Module) -> None:
        self.apply(model, self.trained)

    def fresh_metrics(self, alpha: float | None) -> None:
        """Start the units' accumulators again (reused units keep sharing their computed unit's)."""
        by_trial = {}
        for _, unit in self.computed:
            unit.metrics = by_trial[unit.trial] = PredictionMetrics(alpha)
        for unit in self.units:
            unit.metrics = by_trial[unit.computed_in_trial]


def _plan_units(
    model: nn.Module, targets: Sequence[Target], reset: Reset, trials: Sequence[int], alpha: float | None = None
) -> list[LayerPlan]:
    new_states: dict[tuple[str, int], ModelState] = {}
    for trial in trials:  # trial-outer: rerandomize builds one fresh instance per trial
        for target in targets:
            new_states[(target.name, trial)] = reset.new_states(model, target, trial)
    plans = []
    snapshots: ModelState = {}  # one copy of each module's trained state, however many targets share it
    for target in targets:
        computed: list[tuple[ModelState, Unit]] = []
        units = []
        for trial in trials:
            state = new_states.pop((target.name, trial))
            earlier = next((unit for s, unit in computed if _same_state(s, state)), None)
            if earlier is None:
                unit = Unit(layer=target.name, trial=trial, computed_in_trial=trial, metrics=PredictionMetrics(alpha))
                computed.append((state, unit))
            else:
                unit = Unit(layer=target.name, trial=trial, computed_in_trial=earlier.trial, metrics=earlier.metrics)
            units.append(unit)
        touched = sorted({name for state, _ in computed for name in state})
        for name in touched:
            if name not in snapshots:
                snapshots[name] = snapshot(model.get_submodule(name))
        trained = {name: snapshots[name] for name in touched}
        plans.append(LayerPlan(target, trained, computed, units))
    return plans


def draws_repeat(model: nn.Module, targets: Sequence[Target], reset: Reset) -> bool:
    """Whether ``reset`` gives every target the same state in every trial (``zero``, ``rewind``, ``skip``): its
    trials then differ only in the images they see, as the engine's own check of each trial's state finds."""
    return all(_same_state(reset.new_states(model, target, 0), reset.new_states(model, target, 1))
               for target in targets)


def _same_state(a: ModelState, b: ModelState) -> bool:
    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys() and all(torch.equal(a[m][k], b[m][k]) for k in a[m]) for m in a
    )


def _row(unit: Unit, original: Unit) -> dict:
    return {
        "layer": unit.layer if unit.layer is not None else "original",
        "trial": unit.trial,
        "computed_in_trial": unit.computed_in_trial,
        **unit.metrics.result(original.metrics.result()["top1_acc"]),
    }


# ---------------------------------------------------------------- evaluation


class _Evaluator:
    def __init__(self, model, forward, evalset: EvalSet, options: EngineOptions, device, channels_last: bool,
                 memo: dict, task: Task):
        self.model = model
        self.memo = memo
        self.task = task
        if memo.get("batch_size", options.batch_size) < options.batch_size:  # known not to fit
            options = replace(options, batch_size=memo["batch_size"])
        self.forward = forward
        if device.type == "cuda" and options.engine != "naive":
            evalset = replace(evalset, images=tree_map(lambda t: t.to(device), evalset.images))  # kept on the GPU
        self.evalset = evalset
        self.options = options
        self.device = device
        self.channels_last = channels_last
        self.reference: tuple[torch.Tensor, Reference] | None = None  # the last clean logits scored against, shared
        self.clean: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # naive path: each batch's clean
        # predictions and truth, kept after the first pass
        self.original_done = False  # the unmodified model's row is complete
        self.structure: _CallStructure | None = None
        self.pairs: list[tuple[str, str]] = []  # (conv, BatchNorm) folded together

    def inputs(self, batch):
        return self.task.inputs(batch, self.device, channels_last=self.channels_last)

    def sample(self):
        """Two examples as model input, for probing the model's structure."""
        return self.inputs(take(next(iter(self.batches()))[1], slice(0, 2)))

    def predict(self, x, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's compared logits (float32, on the CPU) and truth of one batch."""
        dtype = PRECISIONS[self.options.precision]
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            logits, truth = self.task.predictions(self.task.call(self.forward, x), x, labels)
        return logits.float().cpu(), truth.cpu()

    def settled(self, unit: Unit) -> bool:
        """With image_target_ci: the unit's estimates are tight enough; it skips the remaining batches."""
        return self.options.image_target_ci is not None and unit.metrics.settled(self.options.image_target_ci)

    def update(self, unit: Unit, logits: torch.Tensor, clean: torch.Tensor, truth: torch.Tensor, part: slice) -> None:
        """Add a batch to the unit's metrics (and hand its logits to ``on_logits``). The clean side's softmaxes are
        computed once per clean tensor: the fast engine scores every unit of a chunk against one batch's."""
        if self.reference is None or self.reference[0] is not clean:
            self.reference = (clean, Reference.of(clean, self.task.score_dtype))
        unit.metrics.update(logits, self.reference[1], truth)
        if self.options.on_logits is not None:
            self.options.on_logits(unit.layer, unit.computed_in_trial, part, logits)

    def batches(self, redecode: bool = False):
        return self.evalset.batches(self.options.batch_size, redecode=redecode)

    # -- naive: one full forward per unit and batch
    def naive_chunk(self, chunk: list[LayerPlan], original: Unit, bar) -> None:
        redecode = self.options.engine == "naive"
        if self.clean is None:
            self.clean = []
            for part, batch, labels in self.batches(redecode):
                clean, truth = self.predict(self.inputs(batch), labels)
                self.clean.append((clean, truth))
                self.update(original, clean, clean, truth, part)
            self.original_done = True
        for plan in chunk:
            for state, unit in plan.computed:
                plan.apply(self.model, state)
                try:
                    for (part, batch, labels), (clean, truth) in zip(self.batches(redecode), self.clean, strict=True):
                        if self.settled(unit):
                            break
                        logits, _ = self.predict(self.inputs(batch), labels)
                        self.update(unit, logits, clean, truth, part)
                        bar.update(1)
                finally:
                    plan.restore(self.model)

    def clean_only(self, original: Unit, bar) -> None:
        for part, batch, labels in self.batches():
            clean, truth = self.predict(self.inputs(batch), labels)
            self.update(original, clean, clean, truth, part)

    # -- fast: batch-outer with prefix replay
    def chunk(self, plans: list[LayerPlan]) -> Iterator[list[LayerPlan]]:
        """Group consecutive layers so that the recorded outputs of one batch stay under ``max_cache_mb``."""
        if "structure" not in self.memo:
            self.memo["structure"] = _CallStructure.probe(self.model, self.sample(), self.task.call)
        self.structure = self.memo["structure"]
        budget = self.options.max_cache_mb * 2**20 / self.options.batch_size
        current: list[LayerPlan] = []
        recorded: set[str] = set()
        for plan in plans:
            plan.replayed = self.structure.replayable_before(self.computing(plan.trained))
            merged = recorded | set(plan.replayed)
            if current and self.structure.bytes_per_image(merged) > budget:
                yield current
                current, merged = [], set(plan.replayed)
            current.append(plan)
            recorded = merged
        if current:
            yield current

    def computing(self, changed) -> list[str]:
        """The modules whose computation a reset of ``changed`` alters: with BatchNorm folded into the convolution
        before it, a changed BatchNorm changes what that convolution computes (so it must not be replayed)."""
        names = set(changed)
        for conv, norm in self.pairs:
            if any(norm == name or norm.startswith(name + ".") for name in changed):
                names.add(conv)
        return sorted(names)

    def replay_chunk(self, chunk: list[LayerPlan], original: Unit, bar) -> None:
        recorded = sorted({name for plan in chunk for name in plan.replayed})
        first_chunk = not self.original_done
        mutated = self.structure.mutated
        for part, batch, labels in self.batches():
            x = self.inputs(batch)
            with _recording(self.model, recorded, copy=mutated) as outputs:
                clean, truth = self.predict(x, labels)
            outputs.check()
            if first_chunk:
                self.update(original, clean, clean, truth, part)
            for plan in chunk:
                with _replaying(self.model, plan.replayed, outputs, copy=mutated):
                    try:
                        for state, unit in plan.computed:
                            if self.settled(unit):
                                continue
                            plan.apply(self.model, state)
                            logits, _ = self.predict(x, labels)
                            outputs.check()  # before trusting the rows or reusing the records
                            self.update(unit, logits, clean, truth, part)
                            bar.update(1)
                    finally:
                        plan.restore(self.model)
            del outputs
            if not first_chunk and all(self.settled(u) for plan in chunk for _, u in plan.computed):
                break
        self.original_done = True


# ---------------------------------------------------------------- prefix replay


@dataclass
class _CallStructure:
    """When each module starts and finishes in one forward, how often it runs, and its output size per image."""

    start: dict[str, int]
    end: dict[str, int]
    calls: dict[str, int]
    aliasing: set[str]
    bytes: dict[str, int]
    children: dict[str, list[str]]
    shared_params: set[str]
    mutated: set[str]  # modules whose output is changed in place after they return (e.g. `x += shortcut`)

    @classmethod
    def probe(cls, model: nn.Module, x, call: Callable | None = None) -> _CallStructure:
        start: dict[str, int] = {}
        end: dict[str, int] = {}
        aliasing: set[str] = set()
        sizes: dict[str, int] = {}
        returned: dict[str, list[tuple[torch.Tensor, int]]] = {}  # each output and its version when returned
        watched = trace(model, x, call=call)
        examples = max(batch_length(x), 1)
        for called in watched.calls:  # in order of starting: a module called twice keeps its first start, last end
            start.setdefault(called.name, called.start)
            end[called.name] = max(end.get(called.name, -1), called.end)
            ins = {t.untyped_storage().data_ptr() for t in called.inputs}
            if any(t.untyped_storage().data_ptr() in ins for t in called.outputs):
                aliasing.add(called.name)
            returned[called.name] = list(zip(called.outputs, called.versions, strict=True))
            sizes[called.name] = sum(t.numel() * t.element_size() for t in called.outputs) // examples
        calls = watched.counts()
        named = dict(model.named_modules())
        children = {name: [f"{name}.{c}" if name else c for c, _ in module.named_children()]
                    for name, module in named.items()}
        owners: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append(name)
        shared = {n for names in owners.values() if len(set(names)) > 1 for n in names}
        mutated = {name for name, outs in returned.items() if any(t._version != v for t, v in outs)}
        return cls(start, end, calls, aliasing, sizes, children, shared, mutated)

    def replayable_before(self, changed: Sequence[str]) -> list[str]:
        """Modules whose recorded clean output can stand in for computing them while ``changed`` are reset."""
        if any(name in self.shared_params for name in changed):
            log.info("%s shares parameters with another module: full forwards for it", ", ".join(changed))
            return []
        starts = [self.start[anchor] for anchor in map(self._called_anchor, changed) if anchor]
        if len(starts) < len(changed):
            return []
        t0 = min(starts)
        path = {prefix for name in changed for prefix in _prefixes(self._called_anchor(name))}
        chosen: list[str] = []

        def visit(parent: str) -> None:
            for child in self.children.get(parent, []):
                if child in path:
                    visit(child)
                elif child not in self.calls:
                    visit(child)  # a container whose children are called directly by an ancestor
                elif self.calls[child] == 1 and self.end[child] < t0 and child not in self.aliasing:
                    chosen.append(child)

        visit("")
        return chosen

    def _called_anchor(self, name: str) -> str:
        """The module itself, or its nearest ancestor that is called (MultiheadAttention.out_proj never is)."""
        while name and name not in self.start:
            name = name.rpartition(".")[0]
        return name

    def bytes_per_image(self, names: set[str]) -> int:
        return sum(self.bytes.get(n, 0) for n in names)


def _prefixes(name: str) -> set[str]:
    parts = name.split(".")
    return {""} | {".".join(parts[: i + 1]) for i in range(len(parts))}


def _clone(output):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, output)


def _containers(output):
    """The same tensors in new containers (a caller may append to a returned list, but not to our record)."""
    return tree_map(lambda t: t, output)


class _RecordChanged(Exception):
    def __init__(self, names: set[str]):
        super().__init__(", ".join(sorted(names)))
        self.names = names


class _Records(dict):
    """Recorded clean outputs by module name. Outputs that nothing changes in place are kept, not copied; their
    version counters are checked after every forward, so a record that did change is never used again."""

    def __init__(self):
        super().__init__()
        self.versions: dict[str, list[tuple[torch.Tensor, int]]] = {}

    def keep(self, name: str, output, copy: bool) -> None:
        self[name] = _clone(output) if copy else _containers(output)
        if not copy:
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
            self.versions[name] = [(t, t._version) for t in tensors]

    def check(self) -> None:
        changed = {n for n, outs in self.versions.items() if any(t._version != v for t, v in outs)}
        if changed:
            raise _RecordChanged(changed)


@contextlib.contextmanager
def _recording(model: nn.Module, names: Sequence[str], copy: set[str]):
    """Record the outputs of ``names`` in the forwards run inside; copy those in ``copy`` at once (something
    changes them in place later in the forward)."""
    outputs = _Records()
    handles = []
    for name in names:
        def hook(module, args, output, name=name):
            outputs.keep(name, output, copy=name in copy)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _replaying(model: nn.Module, names: Sequence[str], outputs: _Records, copy: set[str]):
    """Within the block, the modules ``names`` return their recorded output instead of computing (a fresh copy
    for those in ``copy``, whose output the forward changes in place)."""
    def recorded(name):
        value, fresh = outputs[name], _clone if name in copy else _containers
        return lambda *args, **kwargs: fresh(value)

    return patched_forwards([(model.get_submodule(name), recorded(name)) for name in names])


def _channels_last(options: EngineOptions) -> bool:
    return options.channels_last if options.channels_last is not None else options.engine == "fast"


@contextlib.contextmanager
def layout(model: nn.Module, options: EngineOptions):
    """The engine's memory layout for ``model`` held across several :func:`run` calls (the sequential design's
    trials): each call finds the weights in place instead of converting them there and back."""
    with _memory_format(model, _channels_last(options)):
        yield


@contextlib.contextmanager
def _memory_format(model: nn.Module, channels_last: bool):
    """Within the block the model's weights are NHWC (if asked); afterwards they are as they were."""
    if not channels_last:
        yield
        return
    was_contiguous = all(p.is_contiguous() for p in model.parameters() if p.dim() == 4)
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if was_contiguous:
            model.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _out_of_place(model: nn.Module, enabled: bool = True):
    """Activations and dropouts built ``inplace=True`` compute out of place within the block (same values).

    An in-place ReLU changes its input, which would make the recorded output before it unusable without a copy
    for every replay, and aliases it, which would keep the ReLU itself from being replayed. (Out-of-place outputs
    cost an allocation each; with freed memory kept for reuse, see :func:`keep_freed_memory`, that is cheap.)
    """
    switched = []
    try:
        for module in model.modules() if enabled else ():
            if getattr(module, "inplace", None) is True:
                with contextlib.suppress(AttributeError):  # a read-only property: leave the module as it is
                    module.inplace = False
                    switched.append(module)
        yield
    finally:
        for module in switched:
            module.inplace = True


@contextlib.contextmanager
def _progress(enabled: bool, units: int, n_images: int, batch_size: int):
    n_batches = -(-n_images // batch_size)
    if not enabled:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    with tqdm(total=units * n_batches, desc="layer x trial x batch", unit="fwd", dynamic_ncols=True) as bar:
        yield bar


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass
