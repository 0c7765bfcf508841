"""The memory a prepared measurement needs, estimated before it runs (``layercrit run`` prints it).

Parts, in bytes:

* ``weights`` — the model's parameters and buffers, exactly (tied tensors once).
* ``reset`` — what the reset holds: the new state of every (target, trial) of a stage, all built before the first
  batch (none for ``skip``, which only swaps a forward), and one trained copy of every target module to restore.
* ``data`` — the evaluation set as stored (uint8 images, int64 token ids).
* ``cache`` — the fast engine's recorded outputs for one batch (prefix replay: what the modules before a reset
  target returned, the hidden states at block boundaries for a transformer), bounded by ``max_cache_mb`` as the
  engine chunks its targets; none for the naive engine or with ``compile``.
* ``activations`` — the tensors a forward of one batch holds at once at its peak, from a probe of two examples
  scaled to the batch size.
* ``logits`` — a batch's clean and reset logits (float32; for a language model every position × the vocabulary).
* ``scoring`` — what scoring a batch holds at its peak (copies and softmaxes, in the task's score dtype, from the
  probe's logits scored once); the naive engine also keeps the clean logits of every batch.

Where it lives: on the CPU, all of it. On a GPU, scoring happens in host memory (the engine moves each batch's
logits to the CPU), and so does the evaluation set under the naive engine (the fast engine keeps it on the GPU):
:meth:`MemoryEstimate.needed` splits the total between the device and the host, and :func:`memory_warning` checks
each against what is free there.

An estimate, not a bound: kernels' workspaces and the allocator's slack are not counted.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .metrics import PredictionMetrics, Reference
from .tasks import batch_length, take

PROBE = 2  # examples in the probe forward


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes each part of a run needs (see the module's docstring)."""

    weights: int
    reset: int
    data: int
    cache: int
    activations: int
    logits: int
    scoring: int
    host_data: bool = False  # the evaluation set stays in host memory on a GPU (the naive engine)

    def parts(self) -> dict[str, int]:
        return {name: value for name, value in asdict(self).items() if name != "host_data"}

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def needed(self, device: str) -> dict[str, int]:
        """Bytes needed where they live: ``{device: total}`` where the device shares host memory (the CPU); for a
        GPU run ``{device: ..., "cpu": ...}``, the host holding the scoring (and the naive engine's evaluation set)."""
        if not device.startswith("cuda"):
            return {device: self.total}
        host = self.scoring + (self.data if self.host_data else 0)
        return {device: self.total - host, "cpu": host}

    def line(self, device: str = "cpu") -> str:
        parts = ", ".join(f"{name} {_size(value)}" for name, value in self.parts().items())
        places = self.needed(device)
        where = "" if len(places) == 1 else " — " + ", ".join(f"{_size(v)} on {k}" for k, v in places.items())
        return f"memory needed: about {_size(self.total)} ({parts}){where}"

    def as_dict(self, device: str = "cpu") -> dict:
        """The parts, their total, and ``needed``: the bytes on each place (:meth:`needed`)."""
        return {**self.parts(), "total": self.total, "needed": self.needed(device)}


def estimate_memory(prepared) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of a :class:`~layercrit.measurement.prepare.Prepared` measurement (one probe
    forward of two examples on its device; nothing the measurement uses is changed)."""
    model, options, evalset = prepared.model.model, prepared.options, prepared.evalset
    batch = min(options.batch_size, len(evalset))
    x = prepared.task.inputs(take(evalset.images, slice(0, PROBE)), options.device)
    examples = max(batch_length(x), 1)
    model.to(options.device)
    with torch.no_grad(), _LiveBytes() as live:
        output = prepared.task.call(model, x)
    logits, truth = prepared.task.predictions(output, x, evalset.labels[:examples])
    del output
    logits, truth = logits.detach().float().cpu(), truth.cpu()
    with _LiveBytes() as scoring:  # the metrics' copies, softmaxes and per-item values
        PredictionMetrics().update(logits, Reference.of(logits, prepared.task.score_dtype), truth)  # clean side too
    items, stored = logits.shape[0], logits[0].numel() * 4  # compared items, float32 bytes of one item's logits
    batch_items = math.ceil(items / examples * batch)
    kept_logits = math.ceil(items / examples * len(evalset)) * stored if (
        options.engine == "naive" or options.compile) else 0
    return MemoryEstimate(weights=_bytes(model.parameters(), model.buffers()),
                          reset=_reset_bytes(prepared),
                          data=sum(t.numel() * t.element_size() for t in tree_flatten(evalset.images)[0]
                                   if isinstance(t, torch.Tensor)),
                          cache=_cache_bytes(prepared, x, batch),
                          activations=math.ceil(live.peak / examples * batch),
                          logits=batch_items * 2 * stored,
                          scoring=batch_items * math.ceil(scoring.peak / max(items, 1)) + kept_logits,
                          host_data=options.engine == "naive")


def available_memory(device: str) -> int | None:
    """Bytes free on ``device``: CUDA's free memory, or the CPU's ``MemAvailable``; None where unknown."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_warning(estimate: MemoryEstimate, device: str, *, text: bool) -> str | None:
    """One line when the memory ``estimate`` needs on the device or in host memory (:meth:`MemoryEstimate.needed`)
    exceeds what is free there (:func:`available_memory`), naming what to lower; None otherwise."""
    for place, needed in estimate.needed(device).items():
        available = available_memory(place)
        if available is not None and needed > available:
            lower = "--batch-size, --windows, --seq-len" if text else "--batch-size, --images"
            return (f"this run needs about {_size(needed)}, more than the {_size(available)} available on "
                    f"{place}: lower {lower} (or --max-cache-mb for the cache)")
    return None


def _bytes(*groups) -> int:
    seen: dict[int, int] = {}
    for group in groups:
        for tensor in group:
            if tensor is not None:
                seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _module_bytes(model: nn.Module, names) -> int:
    modules = [model.get_submodule(name) for name in dict.fromkeys(names)]
    return _bytes(*(m.parameters() for m in modules), *(m.buffers() for m in modules))


def _reset_bytes(prepared) -> int:
    model = prepared.model.model
    modules = [m for target in prepared.targets for m in target.modules]
    trained = _module_bytes(model, modules)
    if prepared.reset.name == "skip":
        return trained
    trials = len(prepared.trials) if prepared.design is None else prepared.design.pilot_trials
    return trained + trials * sum(_module_bytes(model, t.modules) for t in prepared.targets)


def _cache_bytes(prepared, x, batch: int) -> int:
    """The recorded outputs of one batch, as :meth:`engine._Evaluator.chunk` groups the targets under the budget."""
    from .engine import _CallStructure

    options = prepared.options
    if options.engine != "fast" or options.compile or not prepared.targets:
        return 0
    structure = _CallStructure.probe(prepared.model.model, x, prepared.task.call)
    replayed = [set(structure.replayable_before(t.modules)) for t in prepared.targets]
    budget = options.max_cache_mb * 2**20 / options.batch_size
    largest = max(structure.bytes_per_image(names) for names in replayed)
    together = structure.bytes_per_image(set().union(*replayed))
    return math.ceil(max(largest, min(together, budget)) * batch)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class _LiveBytes(TorchDispatchMode):
    """The most bytes of tensors created by operators that were alive at once (a storage counts from the first
    tensor that has it until that tensor is freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.storages:
                self.storages.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.storages.discard(key)
        self.live -= nbytes
