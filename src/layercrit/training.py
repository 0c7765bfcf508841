"""Training methods for small image classifiers (the Fashion-MNIST zoo): one function per method family.

Every family is a loss on a batch plus choices of what to train; they all run through one loop, :func:`fit`
(seeded SGD with momentum over a fixed training set, per-step learning-rate schedule). Networks are trained
inside the :class:`~layercrit.models.Normalized` wrapper, so they take images in [0, 1] and adversarial budgets
are in that pixel scale, as in the robustness library the paper's adversarially trained models come from.

Families (``METHODS``):
    supervised      cross-entropy with optional augmentations, label smoothing and mixup
    adversarial     the same on PGD adversarial examples (L∞ or L2 budget ``eps``, random start)
    simclr          SimCLR contrastive pretraining of the backbone, then a linear probe on frozen features
    frozen_random   a randomly initialised backbone, frozen, with a linear probe on its features

Augmentations (``AUGMENTATIONS``, by name) act on float batches in [0, 1] and draw from a CPU generator, so a
seed gives the same training run on any device (up to floating-point reduction order).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import recalibrate_batchnorm
from .data import to_model_input
from .errors import LayercritError, first_line
from .models.base import Normalized

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("fp32", "bf16")
# While a member trains under :func:`resumable`: the folder and the number of fit() calls so far (a method's stages)
_CHECKPOINTS: contextvars.ContextVar[list | None] = contextvars.ContextVar("checkpoints", default=None)


class TrainingClock:
    """Wall and CPU seconds spent training one member, summed over the runs that resumed it (kept beside its
    checkpoints in ``elapsed.json`` after every epoch)."""

    def __init__(self, folder: Path):
        self.path = folder / "elapsed.json"
        saved = _read_json(self.path) if self.path.is_file() else {}
        seconds = saved.get("seconds", 0.0) if isinstance(saved, dict) else None
        cpu_seconds = saved.get("cpu_seconds", 0.0) if isinstance(saved, dict) else None
        if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in (seconds, cpu_seconds)):
            raise LayercritError(f"{self.path} is not a training clock (seconds, cpu_seconds)")
        self.before = (float(seconds), float(cpu_seconds))
        self.start = (time.perf_counter(), time.process_time())

    def total(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds) over every run so far."""
        return (self.before[0] + time.perf_counter() - self.start[0],
                self.before[1] + time.process_time() - self.start[1])

    def save(self) -> None:
        seconds, cpu_seconds = self.total()
        _write_json(self.path, {"seconds": seconds, "cpu_seconds": cpu_seconds})


KEY_FILE = "training.json"  # beside the checkpoints: what defines the training they belong to
_CHECKPOINT_KEYS = {"module", "optimizer", "generator", "step", "losses"}


@contextlib.contextmanager
def resumable(folder: str | Path, key: dict | None = None) -> Iterator[TrainingClock]:
    """Within this block every :func:`fit` keeps its state in ``folder`` after each epoch (stage k of a method:
    ``stage-k.pt``) and starts from it when it is there, so a killed training run, started again, goes on from
    its last finished epoch with the same numbers an uninterrupted run gives. Yields the member's
    :class:`TrainingClock`, which counts the time of the earlier runs too.

    ``key`` (JSON data) is everything that defines the training: seed, recipe with its hyperparameters, a
    fingerprint of the data. It is kept in ``folder/training.json``, and state left by a training with another key,
    or state that cannot be read, is refused (:func:`resume_problem` says why) rather than continued.
    """
    folder = Path(folder)
    problem = resume_problem(folder, key)
    if problem:
        raise LayercritError(f"{problem}; delete {folder} to train from the start")
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / KEY_FILE, _as_json(key))
    clock = TrainingClock(folder)
    token = _CHECKPOINTS.set([folder, 0, clock])
    try:
        yield clock
    finally:
        _CHECKPOINTS.reset(token)


def resume_problem(folder: str | Path, key: dict | None = None) -> str | None:
    """Why the training state in ``folder`` cannot be continued as the training ``key`` describes (one line), or
    None when it can (or there is none): a file that is not what it should be, or a training with other settings,
    named field by field (``seed 0, not 1``)."""
    folder = Path(folder)
    stages = sorted(folder.glob("stage-*.pt"))
    if not stages and not (folder / "elapsed.json").is_file():
        return None  # nothing to continue (a training.json alone is replaced)
    try:
        TrainingClock(folder)
        for path in stages:
            _load_checkpoint(path)
        if not (folder / KEY_FILE).is_file():
            return f"{folder} holds an unfinished training without {KEY_FILE}, the record of its settings"
        recorded = _read_json(folder / KEY_FILE)
    except LayercritError as error:
        return str(error)
    differences = _differences(recorded, _as_json(key))
    if differences:
        return (f"{folder} holds the unfinished training of other settings ({'; '.join(differences)}); rerun with "
                "those to finish it")
    return None


def _differences(recorded, wanted, path: str = "") -> list[str]:
    """The fields where two JSON values differ, as ``name recorded, not wanted``."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        return [line for name in sorted(set(recorded) | set(wanted), key=str)
                for line in _differences(recorded.get(name), wanted.get(name), f"{path}.{name}" if path else name)]
    if recorded == wanted:
        return []
    return [f"{path or 'key'} {json.dumps(recorded)}, not {json.dumps(wanted)}"]


def _as_json(value):
    return json.loads(json.dumps(value, sort_keys=True))  # tuples as lists, as they are read back


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise LayercritError(f"{path} is unreadable ({type(error).__name__}: {first_line(error)})") from None


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict:
    """A training checkpoint written by :func:`fit`; anything else (truncated, empty, foreign) is a one-line error."""
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as error:  # torch raises many types for bytes that are not a checkpoint (EOF, zip, pickle)
        raise LayercritError(f"{path} is not a readable training checkpoint ({type(error).__name__}: "
                             f"{first_line(error)})") from None
    if not isinstance(saved, dict) or not _CHECKPOINT_KEYS <= saved.keys():
        raise LayercritError(f"{path} is not a training checkpoint (no {', '.join(sorted(_CHECKPOINT_KEYS))})")
    return saved


def _next_checkpoint() -> tuple[Path, TrainingClock] | None:
    state = _CHECKPOINTS.get()
    if state is None:
        return None
    state[1] += 1
    return state[0] / f"stage-{state[1] - 1}.pt", state[2]


# ---------------------------------------------------------------- augmentations


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (high - low) + low


def _affine(x: torch.Tensor, scale: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor) -> torch.Tensor:
    """Per-sample zoom (``scale`` < 1 zooms in) and shift in pixels; outside the image is black (0), as FMNIST's border."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = 2 * shift_x / w
    theta[:, 1, 2] = 2 * shift_y / h
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop after 4-pixel zero padding (integer shifts of up to ±4 px), the CIFAR ResNet recipe."""
    n = len(x)
    shifts = torch.randint(-4, 5, (2, n), generator=g).float()
    return _affine(x, torch.ones(n), shifts[0], shifts[1])


def resized_crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random resized crop: a square of 30-100% of the area, anywhere in the image, scaled back to full size."""
    n, _, h, _ = x.shape
    scale = _uniform(n, 0.3, 1.0, g).sqrt()
    room = (1 - scale) * h / 2
    return _affine(x, scale, (torch.rand(n, generator=g) * 2 - 1) * room, (torch.rand(n, generator=g) * 2 - 1) * room)


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Horizontal flip with probability 1/2 (Fashion-MNIST classes are mirror-symmetric)."""
    mask = (torch.rand(len(x), generator=g) < 0.5).view(-1, 1, 1, 1).to(x.device)
    return torch.where(mask, x.flip(-1), x)


def erase(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020): with probability 1/2, a rectangle of 2-25% of the area becomes noise."""
    n, c, h, w = x.shape
    area = _uniform(n, 0.02, 0.25, g) * h * w
    aspect = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), g))
    eh = (area * aspect).sqrt().round().clamp(1, h).long()
    ew = (area / aspect).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, generator=g) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=g) * (w - ew + 1)).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)))
    box &= (torch.rand(n, generator=g) < 0.5).view(-1, 1, 1)
    fill = torch.rand(n, c, h, w, generator=g)
    return torch.where(box.unsqueeze(1).to(x.device), fill.to(x.device), x)


def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise with a per-image standard deviation drawn from U(0, 0.2), clipped to [0, 1]."""
    sigma = _uniform(len(x), 0.0, 0.2, g).view(-1, 1, 1, 1)
    return (x + (torch.randn(x.shape, generator=g) * sigma).to(x.device)).clamp(0, 1)


def jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness and contrast jitter (factors in [0.6, 1.4]), the greyscale part of SimCLR's colour jitter."""
    n = len(x)
    brightness = _uniform(n, 0.6, 1.4, g).view(-1, 1, 1, 1).to(x.device)
    contrast = _uniform(n, 0.6, 1.4, g).view(-1, 1, 1, 1).to(x.device)
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean).clamp(0, 1)


AUGMENTATIONS: dict[str, Augment] = {
    "crop": crop,
    "resized_crop": resized_crop,
    "flip": flip,
    "erase": erase,
    "noise": noise,
    "jitter": jitter,
}


def augmenter(names: Sequence[str]) -> Augment:
    """The named augmentations applied in order."""
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise LayercritError(f"unknown augmentation {unknown[0]!r}: one of {', '.join(AUGMENTATIONS)}")

    def apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for name in names:
            x = AUGMENTATIONS[name](x, g)
        return x

    return apply


# ---------------------------------------------------------------- the training loop


def fit(
    module: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
    *,
    epochs: float,
    batch_size: int = 128,
    lr: float = 0.1,
    schedule: str = "step",
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    precision: str = "fp32",
    seed: int = 0,
) -> list[float]:
    """Train ``module``'s parameters that require grad with SGD on ``loss_fn(batch_inputs, batch_labels, generator)``.

    Args:
        module: holds the parameters to train; put it (and any frozen parts) in the right train/eval mode first.
        inputs, labels: the training set (CPU tensors); ``loss_fn`` moves batches to the device.
        epochs: passes over the data (fractions allowed: the last pass stops early).
        schedule: ``constant``, ``step`` (×0.1 after 50% and 75% of the steps) or ``cosine`` (to 0), per step.
        precision: ``fp32``, or ``bf16``: mixed precision (``torch.autocast`` to bfloat16 on the parameters'
            device; weights, optimizer state and BatchNorm stay float32), 2.2× faster on a CPU with AMX (benchmarks/training.py).
        seed: seeds the batch order and the generator handed to ``loss_fn`` (augmentation, attack starts).

    Returns:
        The mean loss of every epoch.
    """
    if schedule not in SCHEDULES:
        raise LayercritError(f"unknown learning-rate schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    if precision not in PRECISIONS:
        raise LayercritError(f"unknown training precision {precision!r}: one of {', '.join(PRECISIONS)}")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    losses: list[float] = []
    step = 0
    checkpoint, clock = _next_checkpoint() or (None, None)
    if checkpoint is not None and checkpoint.is_file():
        saved = _load_checkpoint(checkpoint)
        try:
            module.load_state_dict(saved["module"])
            optimizer.load_state_dict(saved["optimizer"])
            g.set_state(saved["generator"])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise LayercritError(f"{checkpoint} does not fit this training ({first_line(error)}); delete "
                                 f"{checkpoint.parent} to train from the start") from None
        step, losses = saved["step"], saved["losses"]
    device_type = params[0].device.type if params else "cpu"
    module.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU; numbers as contiguous
    while step < total:
        order = torch.randperm(len(labels), generator=g)
        epoch_losses = []
        for start in range(0, len(order), batch_size):
            if step == total:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(schedule, step, total)
            idx = order[start:start + batch_size]
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(inputs[idx], labels[idx], g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_losses.append(loss.item())
            step += 1
        losses.append(sum(epoch_losses) / len(epoch_losses))
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                                          "generator": g.get_state(), "step": step, "losses": losses})
            clock.save()
    module.to(memory_format=torch.contiguous_format)
    return losses


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _lr_factor(schedule: str, step: int, total: int) -> float:
    progress = step / total
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


# ---------------------------------------------------------------- method families


def train_supervised(
    net: Normalized,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float,
    augment: Sequence[str] = (),
    label_smoothing: float = 0.0,
    mixup: float = 0.0,
    device: str = "cpu",
    seed: int = 0,
    **optim,
) -> list[float]:
    """Cross-entropy training of the whole network (baseline, improved recipes, augmentation variants).

    Args:
        net: the wrapped network (input in [0, 1]). images, labels: uint8 N×C×H×W and int64 labels.
        augment: names from :data:`AUGMENTATIONS`, applied in order. label_smoothing: as in ``F.cross_entropy``.
        mixup: Beta(α, α) parameter of mixup (Zhang et al. 2018); 0 turns it off.
        optim: ``batch_size``, ``lr``, ``schedule``, ``momentum``, ``nesterov``, ``weight_decay`` of :func:`fit`.

    Returns:
        The mean loss of every epoch.
    """
    return _fit_classifier(net, images, labels, epochs=epochs, augment=augment, label_smoothing=label_smoothing,
                           mixup=mixup, attack=None, device=device, seed=seed, **optim)


def train_adversarial(
    net: Normalized,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float,
    norm: str,
    eps: float,
    steps: int = 2,
    augment: Sequence[str] = (),
    device: str = "cpu",
    seed: int = 0,
    **optim,
) -> list[float]:
    """PGD adversarial training (Madry et al. 2018): cross-entropy on worst-case inputs within an ``eps`` ball.

    Args:
        norm: ``linf`` or ``l2``; eps: the budget in [0, 1] pixel units (L∞: per pixel, L2: over the image).
        steps: PGD steps from a random start, step size 2.5·eps/steps (as in the robustness library).
        epochs, augment, device, seed, optim: as in :func:`train_supervised`.

    Returns:
        The mean (adversarial) loss of every epoch.
    """
    if norm not in ("linf", "l2"):
        raise LayercritError(f"unknown PGD norm {norm!r}: linf or l2")
    attack = _Pgd(norm=norm, eps=eps, steps=steps)
    return _fit_classifier(net, images, labels, epochs=epochs, augment=augment, label_smoothing=0.0, mixup=0.0,
                           attack=attack, device=device, seed=seed, **optim)


def train_simclr(
    net: Normalized,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float,
    augment: Sequence[str] = ("resized_crop", "flip", "jitter", "noise"),
    temperature: float = 0.5,
    projection_dim: int = 64,
    probe: dict | None = None,
    device: str = "cpu",
    seed: int = 0,
    **optim,
) -> list[float]:
    """SimCLR (Chen et al. 2020): contrastive pretraining of the backbone on two views, then a linear probe.

    The projection head (feature → feature → ``projection_dim`` MLP) is thrown away; the classifier ``fc`` is
    then trained on the frozen backbone's features of the un-augmented training images, without labels ever
    reaching the backbone.

    Args:
        epochs: pretraining passes; augment: the view augmentations; temperature: of the NT-Xent loss.
        probe: options of :func:`train_linear_probe` (``epochs``, ``lr``, ...).
        device, seed, optim: as in :func:`train_supervised`.

    Returns:
        The mean contrastive loss of every pretraining epoch.
    """
    backbone = net.model
    width = backbone.fc.in_features
    head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, projection_dim)).to(device)
    views = augmenter(augment)

    def contrastive_loss(batch: torch.Tensor, _labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = to_model_input(batch)
        both = torch.cat([views(x, g), views(x, g)]).to(device)
        z = F.normalize(head(features(net, both)), dim=1)
        similarity = z @ z.T / temperature
        similarity.fill_diagonal_(float("-inf"))
        n = len(batch)
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(device)
        return F.cross_entropy(similarity, positives)

    trained = nn.ModuleList([backbone, head]).train()
    backbone.fc.requires_grad_(False)
    losses = fit(trained, images, labels, contrastive_loss, epochs=epochs, seed=seed, **optim)
    backbone.fc.requires_grad_(True)
    train_linear_probe(net, images, labels, device=device, seed=seed, **(probe or {}))
    return losses


def train_frozen_random(
    net: Normalized,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    probe: dict | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> list[float]:
    """A frozen randomly initialised backbone with a trained linear classifier (the paper's "freezing" model).

    The backbone's weights stay at their random init; its BatchNorm running statistics are set to the
    statistics of the training images (one pass, no gradient), so the features the classifier sees are on a
    sane scale.

    Args:
        probe: options of :func:`train_linear_probe`. device, seed: as in :func:`train_supervised`.

    Returns:
        The mean loss of every probe epoch.
    """
    calibrate_batchnorm(net, images, device=device)
    return train_linear_probe(net, images, labels, device=device, seed=seed, **(probe or {}))


METHODS: dict[str, Callable[..., list[float]]] = {
    "supervised": train_supervised,
    "adversarial": train_adversarial,
    "simclr": train_simclr,
    "frozen_random": train_frozen_random,
}


# ---------------------------------------------------------------- shared pieces


def features(net: Normalized, x: torch.Tensor) -> torch.Tensor:
    """The pooled backbone features (before ``fc``) of images in [0, 1]."""
    return net.model.forward_features((x - net.mean) / net.std)


def train_linear_probe(
    net: Normalized,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float = 30,
    batch_size: int = 256,
    lr: float = 0.5,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    device: str = "cpu",
    seed: int = 0,
) -> list[float]:
    """Train only ``net.model.fc`` (re-initialised) on the frozen backbone's features of the training images.

    The features are computed once in eval mode and the probe trained on them (standardised), which is
    training ``fc`` on the frozen network without augmentation, at a fraction of the cost.

    Returns:
        The mean loss of every epoch.
    """
    net.eval()
    with torch.no_grad():
        feats = torch.cat([features(net, to_model_input(images[i:i + 1000]).to(device)).cpu()
                           for i in range(0, len(images), 1000)])
    # Standardised features make one learning rate work for any backbone (a random one's features are far
    # from unit scale); the standardisation is folded into fc afterwards, so the network is unchanged.
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    fc = net.model.fc
    fc.reset_parameters()

    def probe_loss(batch: torch.Tensor, y: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(fc(batch.to(device)), y.to(device))

    losses = fit(fc, (feats - mean) / std, labels, probe_loss, epochs=epochs, batch_size=batch_size, lr=lr,
                 schedule=schedule, weight_decay=weight_decay, seed=seed)
    with torch.no_grad():
        fc.weight.div_(std.to(device))
        fc.bias.sub_(fc.weight @ mean.to(device))
    return losses


@torch.no_grad()
def calibrate_batchnorm(net: Normalized, images: torch.Tensor, *, device: str = "cpu", batch_size: int = 1000) -> None:
    """Set every BatchNorm's running mean/variance to the exact statistics over ``images`` (weights untouched)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    net.to(device).eval()
    recalibrate_batchnorm(net, norms, (images[i:i + batch_size] for i in range(0, len(images), batch_size)))


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: str = "cpu",
             batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent of a network taking images in [0, 1]."""
    net.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = net(to_model_input(images[start:start + batch_size]).to(device))
        correct += int((logits.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return 100.0 * correct / len(labels)


def robust_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, norm: str, eps: float,
                    steps: int = 10, device: str = "cpu", batch_size: int = 250, seed: int = 0) -> float:
    """Top-1 accuracy (percent) on PGD adversarial examples: ``steps`` steps from a random start, step size
    2.5·eps/steps, the ``eps`` ball in [0, 1] pixel units (``norm`` linf or l2)."""
    attack = _Pgd(norm=norm, eps=eps, steps=steps)
    g = torch.Generator().manual_seed(seed)
    net = net.eval().to(device)
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = to_model_input(images[start:start + batch_size]).to(device)
        y = labels[start:start + batch_size].to(device)
        adversarial = attack(net, x, y, g)
        with torch.no_grad():
            correct += int((net(adversarial).argmax(1) == y).sum())
    return 100.0 * correct / len(labels)


class _Pgd:
    """Projected gradient descent inside an L∞ or L2 ball, from a uniform random start."""

    def __init__(self, *, norm: str, eps: float, steps: int):
        self.norm, self.eps, self.steps = norm, eps, steps
        self.step_size = 2.5 * eps / steps

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        delta = self._project(self._start(x, g).to(x.device), x)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(net(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if self.norm == "linf":
                    delta = delta + self.step_size * grad.sign()
                else:
                    delta = delta + self.step_size * grad / _l2(grad).clamp_min(1e-12)
                delta = self._project(delta, x)
        return (x + delta).detach()

    def _start(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.norm == "linf":
            return (torch.rand(x.shape, generator=g) * 2 - 1) * self.eps
        direction = torch.randn(x.shape, generator=g)
        radius = torch.rand(len(x), generator=g).view(-1, 1, 1, 1) * self.eps
        return direction / _l2(direction) * radius

    def _project(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            delta = delta * (self.eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta).clamp(0, 1) - x


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _fit_classifier(net, images, labels, *, epochs, augment, label_smoothing, mixup, attack, device, seed, **optim):
    aug = augmenter(augment)

    def loss_fn(batch: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = aug(to_model_input(batch), g).to(device)
        y = y.to(device)
        if attack is not None:
            x = attack(net, x, y, g)
        if mixup <= 0:
            return F.cross_entropy(net(x), y, label_smoothing=label_smoothing)
        # torch's Beta sampler takes no generator: draw lambda with numpy, seeded from ours.
        lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=g))).beta(mixup, mixup))
        perm = torch.randperm(len(y), generator=g).to(device)
        out = net(lam * x + (1 - lam) * x[perm])
        return (lam * F.cross_entropy(out, y, label_smoothing=label_smoothing)
                + (1 - lam) * F.cross_entropy(out, y[perm], label_smoothing=label_smoothing))

    net.train()
    return fit(net, images, labels, loss_fn, epochs=epochs, seed=seed, **optim)
