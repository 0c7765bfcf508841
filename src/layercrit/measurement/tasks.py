"""Tasks: what a batch is, how the model is called, and which output distribution is compared.

The engine, the sequential design, the resets (BatchNorm tracing and recalibration) and the checks before a run
never look inside a batch: they hand it to the run's :class:`Task`. A batch is what the evaluation set stores
(:attr:`layercrit.data.EvalSet.images`: a tensor, or a dict of tensors, N examples along the first dimension)
with its labels. The task turns it into the model's input, calls the model, and returns the compared
*predictions*: logits ``M × C`` (one distribution per compared item) and the truth ``M`` (class indices) that
accuracy and the loss use. For a classifier the items are the examples (M = N); for a language model they are
the unmasked positions of every window (M = the batch's counted tokens). Every metric is a mean over items.

Tasks (by name, :data:`TASKS`):

* ``image-classification`` — images N×C×H×W (uint8, or float in [0, 1]) in, class logits N×C out: the paper's.
* ``sequence-classification`` — token ids N×T (int64), or a dict of tensors such as ``{"input_ids",
  "attention_mask"}`` passed as keywords; class logits N×C out (a tensor, a tuple or a ``ModelOutput``'s
  ``.logits``).

How to add a task:

1. Subclass :class:`Task` and set ``name``. Override what differs:
   :meth:`~Task.inputs` (stored batch → model input on the device; default: every tensor moved),
   :meth:`~Task.call` (default: ``model(x)``, or ``model(**x)`` for a dict),
   :meth:`~Task.predictions` (model output → ``(logits M×C, truth M)``; default: :func:`output_logits` of the
   output, one item per example, the labels as truth),
   :meth:`~Task.check` (refuse data the task cannot use, one line naming the fix).
   A per-position task (a language model's next-token distributions) returns the logits at the counted positions
   only, flattened, with the next tokens as truth.
2. Register it: ``TASKS[MyTask.name] = MyTask``; ``measure(..., task="my-task")`` (or ``task=MyTask()``) and
   ``layercrit run --task my-task`` then use it.
3. Measure a tiny model with both engines (``engine="fast"`` and ``"naive"``, ``exact=True``): the rows must be
   identical (see tests/test_tasks.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..data.evalset import EvalSet, to_model_input
from ..errors import LayercritError
from ..models.base import Normalized, ResolvedModel


def output_logits(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a ``ModelOutput``'s (or any object's) ``.logits``, a
    dict's ``"logits"``, or a tuple's first element (as transformers models return with ``return_dict=False``)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise LayercritError(f"the model returned a {type(output).__name__}, with no logits in it: return a tensor, "
                             "a tuple (logits first) or an object with .logits")
    return logits


def batch_length(inputs: Any) -> int:
    """The number of examples in a batch (a tensor, or a dict/tuple of tensors, examples first)."""
    tensors = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    return len(tensors[0]) if tensors else 0


def take(inputs: Any, index: slice | torch.Tensor) -> Any:
    """The examples ``index`` of a stored batch (a tensor, or a dict of tensors)."""
    return tree_map(lambda t: t[index] if isinstance(t, torch.Tensor) else t, inputs)


PROBE_EXAMPLES = 8  # few enough to fit wherever a batch of the run will (the engine halves its batch when out of memory)


class Task:
    """The default task: tensors in (examples first), a tensor of class logits per example out."""

    name: ClassVar[str] = "task"
    score_dtype: ClassVar[torch.dtype] = torch.float64
    """What the metrics compute each item's values in (:class:`~layercrit.measurement.metrics.Reference`)."""

    def inputs(self, batch: Any, device: torch.device | str, *, channels_last: bool = False) -> Any:
        """A stored batch as the model takes it, on ``device``."""
        return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)

    def call(self, model: nn.Module, inputs: Any) -> Any:
        """Call the model on a batch of inputs (keyword arguments for a dict)."""
        return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)

    def predictions(self, output: Any, inputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compared distributions (logits M×C) and the truth (M class indices) of one batch."""
        logits = output_logits(output)
        if logits.ndim != 2:
            raise LayercritError(f"task {self.name}: the model gives outputs of shape {tuple(logits.shape)}, not one "
                                 "row of class logits per example (a language model's per-position outputs need "
                                 "a per-position task)")
        return logits, labels.to(logits.device)

    def check(self, evalset: EvalSet, resolved: ResolvedModel) -> None:
        """Refuse data this task cannot use with this model (before any work)."""

    def probe(self, model: nn.Module, evalset: EvalSet, device: str, examples: int = PROBE_EXAMPLES) -> int:
        """A few examples through the unmodified model: its classes must cover the labels; warn when its
        predictions are near uniform (criticalities then compare noise). Returns the number of classes compared."""
        part = slice(0, min(examples, len(evalset)))
        x = self.inputs(take(evalset.images, part), device)
        with torch.no_grad():
            logits, truth = self.predictions(self.call(model.to(device), x), x, evalset.labels[part])
        classes = logits.shape[-1]
        labels = evalset.labels if isinstance(evalset.labels, torch.Tensor) and evalset.labels.ndim == 1 else truth
        counted = labels[labels >= 0]  # every label, not only the probed examples'
        top = int(counted.max()) if len(counted) else -1
        if top >= classes:
            raise LayercritError(
                f"labels go up to {top} but the model has {classes} outputs: the data's classes do not match the "
                "model's (use a model trained on this data, or --num-classes with a checkpoint)")
        if classes > 1 and len(logits):
            entropy = -(F.softmax(logits.double(), 1) * F.log_softmax(logits.double(), 1)).sum(1).mean().item()
            if entropy > 0.95 * math.log(classes):
                warnings.warn(f"the unmodified model's predictions are near uniform (mean entropy {entropy:.2f} of at "
                              f"most {math.log(classes):.2f} nats): criticalities will mean little; check the "
                              "model's weights and its input preprocessing", UserWarning, stacklevel=3)
        return classes


class ImageClassification(Task):
    """Images N×C×H×W (uint8, or float in [0, 1]) in, class logits out: the paper's task."""

    name: ClassVar[str] = "image-classification"

    def inputs(self, batch: torch.Tensor, device: torch.device | str, *, channels_last: bool = False) -> torch.Tensor:
        x = to_model_input(batch.to(device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def check(self, evalset: EvalSet, resolved: ResolvedModel) -> None:
        images = evalset.images
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise LayercritError(f"images must be N×C×H×W for task image-classification, got {shape} (token ids "
                                 "are task='sequence-classification')")
        in_chans = resolved.preprocessing.in_chans  # 0: not known (a model without convolutions)
        channels = images.shape[1]
        if in_chans and channels != in_chans and not (channels == 1 and in_chans == 3):
            raise LayercritError(f"the model takes {in_chans}-channel input but the data has {channels}-channel "
                                 f"images: use data with {in_chans}-channel images (e.g. fashion-mnist for a "
                                 "1-channel model) or a model for this data")
        wrapper = resolved.model
        normalises = isinstance(wrapper, Normalized) and bool((wrapper.mean != 0).any() or (wrapper.std != 1).any())
        if normalises and images.is_floating_point() and len(images):
            low, high = float(images.min()), float(images.max())
            if low < 0 or high > 1:
                raise LayercritError(f"float images in [{low:.2f}, {high:.2f}], but the model wrapper normalises "
                                     "images in [0, 1]: for images already normalised pass normalize=False")


class SequenceClassification(Task):
    """Token ids N×T (int64), or a dict of tensors (``input_ids``, ``attention_mask``, ...) given to the model as
    keywords; class logits out (a tensor, a tuple or a ``ModelOutput``)."""

    name: ClassVar[str] = "sequence-classification"

    def check(self, evalset: EvalSet, resolved: ResolvedModel) -> None:
        ids = evalset.images.get("input_ids") if isinstance(evalset.images, Mapping) else evalset.images
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point():
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise LayercritError(f"task sequence-classification takes token ids N×T (integers), or a dict with "
                                 f"input_ids N×T, got {shape}")


class CausalLanguageModel(Task):
    """Windows of token ids (N×T, or a dict with ``input_ids`` and ``attention_mask``) in, next-token logits
    N×T×V out (a tensor or a ``ModelOutput``'s ``.logits``). The compared items are the predicted positions: every
    position whose token and next token are both real (mask 1), its truth the next token, so ``loss`` is the mean
    next-token NLL (perplexity = exp(loss)) and ``top1_acc`` next-token accuracy."""

    name: ClassVar[str] = "causal-lm"
    score_dtype: ClassVar[torch.dtype] = torch.float32  # softmaxes over the vocabulary at every position: 3× faster

    def inputs(self, batch: Any, device: torch.device | str, *, channels_last: bool = False) -> dict:
        batch = batch if isinstance(batch, Mapping) else {"input_ids": batch}
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch.get("attention_mask")
        return {"input_ids": ids,
                "attention_mask": torch.ones_like(ids) if mask is None else mask.to(device, non_blocking=True)}

    def predictions(self, output: Any, inputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = output_logits(output)
        if logits.ndim != 3:
            raise LayercritError(f"task causal-lm: the model gives outputs of shape {tuple(logits.shape)}, not "
                                 "next-token logits N×T×V")
        mask = inputs["attention_mask"]
        counted = (mask[:, :-1] * mask[:, 1:]).bool()
        return logits[:, :-1][counted], inputs["input_ids"][:, 1:][counted]

    def check(self, evalset: EvalSet, resolved: ResolvedModel) -> None:
        ids = evalset.images.get("input_ids") if isinstance(evalset.images, Mapping) else evalset.images
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point():
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise LayercritError(f"task causal-lm takes windows of token ids N×T (integers), or a dict with "
                                 f"input_ids N×T, got {shape}: give text data (FILE.txt, FILE.jsonl, hf-dataset:..., "
                                 "python-stdlib)")


TASKS: dict[str, type[Task]] = {task.name: task for task in (ImageClassification, SequenceClassification,
                                                             CausalLanguageModel)}
"""Every task by name; a new task registers itself here."""

DEFAULT_TASK = ImageClassification.name


def get_task(task: str | Task | None) -> Task:
    """A task object from its name (or the object itself); None: image classification."""
    if isinstance(task, Task):
        return task
    name = DEFAULT_TASK if task is None else task
    if name not in TASKS:
        raise LayercritError(f"task={name!r}: unknown task; one of {', '.join(TASKS)}")
    return TASKS[name]()
