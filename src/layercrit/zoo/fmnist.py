"""The Fashion-MNIST zoo: one small ResNet trained with different methods, a miniature of the paper's ResNet-50 zoo.

:data:`RECIPES` are the records of how each member is trained (method family of :mod:`layercrit.training`,
category as in the paper, hyperparameters). :func:`train_zoo` trains them and writes ``ID.safetensors`` plus
``manifest.yaml`` (the recipe, measured test, linear-probe and robust accuracy, seed, device, training time) into
a folder; the package ships one such folder, trained with ``layercrit zoo train --threads 2 --out DIR`` on this
project's 2-core CPU (about 2 hours; resumable, so it may span several runs) and copied into
``src/layercrit/zoo/fmnist``. Weights are stored
in float16 (half the size) and loaded back as float32; the recorded accuracies are those of the stored weights.

Set ``LAYERCRIT_FMNIST_ZOO=DIR`` to use a zoo you trained yourself as ``zoo:fmnist/ID``.

Training-seed replicates of a member are ``zoo:fmnist/ID@seedN`` (``baseline@seed1``; ``ID`` itself is seed 0).
They live in subfolders ``seedN`` of the zoo folder, each a zoo folder of its own as ``layercrit zoo train --seed N
--out DIR/seedN`` writes it (see docs/demo.md for the replicates shipped and how to train the rest).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
import yaml
from torch import nn

from ..data import load_fashion_mnist, subset_indices
from ..errors import LayercritError
from ..models.base import Normalized, ResolvedModel, wrap_module
from ..models.builders import build_architecture
from ..models.checkpoints import load_strict
from ..names import file_name
from ..seeds import method_and_seed, with_seed
from ..training import (
    METHODS,
    PRECISIONS,
    accuracy,
    resumable,
    resume_problem,
    robust_accuracy,
    train_linear_probe,
)
from ._manifest import MANIFEST, write_record

ARCH = "layercrit:fmnist_resnet20"
STORAGE_DTYPE = torch.float16
DATA_SEED = 0  # every member sees the same training images, so only the method differs


TRAIN_IMAGES = 60000  # the whole Fashion-MNIST training split
PROBE = {"epochs": 30, "lr": 0.5}  # the linear probe of simclr, frozen_random and every member's probe_accuracy


def _pgd(norm: str, eps: float, label: str, key: str) -> dict:
    return {
        "id": f"pgd_{norm}_{key}", "method": "adversarial", "category": "adversarial_training",
        "display": f"PGD {'L∞' if norm == 'linf' else 'L2'} ε={label}", "budget": f"{norm} {label}",
        "train_images": TRAIN_IMAGES,
        "hyperparameters": {"epochs": 4, "norm": norm, "eps": eps, "steps": 3, "augment": ["crop", "flip"],
                            "lr": 0.1, "schedule": "step", "precision": "bf16"},
    }


RECIPES: list[dict] = [
    {"id": "baseline", "method": "supervised", "category": "baseline", "display": "Baseline (SGD, step decay)",
     "train_images": TRAIN_IMAGES,
     "hyperparameters": {"epochs": 10, "augment": ["crop", "flip"], "lr": 0.1, "schedule": "step",
                         "precision": "bf16"}},
    {"id": "improved", "method": "supervised", "category": "training_recipes",
     "display": "Improved (cosine, label smoothing, mixup, longer)", "train_images": TRAIN_IMAGES,
     "hyperparameters": {"epochs": 12, "augment": ["crop", "flip"], "lr": 0.1, "schedule": "cosine",
                         "nesterov": True, "label_smoothing": 0.1, "mixup": 0.2, "precision": "bf16"}},
    {"id": "aug_erase", "method": "supervised", "category": "augmentation", "display": "Random erasing",
     "train_images": TRAIN_IMAGES,
     "hyperparameters": {"epochs": 10, "augment": ["crop", "flip", "erase"], "lr": 0.1, "schedule": "step",
                         "precision": "bf16"}},
    {"id": "aug_noise", "method": "supervised", "category": "augmentation", "display": "Gaussian noise",
     "train_images": TRAIN_IMAGES,
     "hyperparameters": {"epochs": 10, "augment": ["crop", "flip", "noise"], "lr": 0.1, "schedule": "step",
                         "precision": "bf16"}},
    _pgd("linf", 2 / 255, "2/255", "2"),
    _pgd("linf", 8 / 255, "8/255", "8"),
    _pgd("linf", 24 / 255, "24/255", "24"),
    _pgd("l2", 0.5, "0.5", "0.5"),
    _pgd("l2", 1.5, "1.5", "1.5"),
    {"id": "simclr", "method": "simclr", "category": "contrastive", "display": "SimCLR + linear probe",
     "train_images": TRAIN_IMAGES,
     "hyperparameters": {"epochs": 10, "batch_size": 256, "lr": 0.5, "schedule": "cosine", "weight_decay": 1e-4,
                         "temperature": 0.5, "precision": "bf16", "probe": dict(PROBE)}},
    {"id": "frozen_random", "method": "frozen_random", "category": "freezing",
     "display": "Frozen random backbone + linear probe", "train_images": TRAIN_IMAGES,
     "hyperparameters": {"probe": dict(PROBE)}},
]
"""How each member is trained. ``budget`` is the adversarial budget (pixel scale [0, 1]) for the figures."""


def zoo_dir() -> Path:
    """The folder the zoo is read from: ``$LAYERCRIT_FMNIST_ZOO`` or the one shipped in the package."""
    return Path(os.environ.get("LAYERCRIT_FMNIST_ZOO") or Path(__file__).with_name("fmnist"))


def entries(replicates: bool = False) -> list[dict]:
    """The manifest records of the trained zoo (recipe fields plus ``accuracy``, ``file``, ``train_time_s``, ...);
    with ``replicates``, followed by those of every training-seed replicate (:func:`seed_replicates`)."""
    return _manifest(zoo_dir()) + (seed_replicates() if replicates else [])


def seed_replicates() -> list[dict]:
    """The records of the training-seed replicates (folders ``seedN`` of the zoo folder), with ids ``ID@seedN``,
    ``member`` the member's id and ``file`` relative to the zoo folder; by seed, then in zoo order."""
    records = []
    for folder in sorted(zoo_dir().glob("seed*"), key=lambda p: (len(p.name), p.name)):
        if not (folder / MANIFEST).is_file():
            continue
        for record in _manifest(folder):
            if f"seed{record.get('seed')}" != folder.name:
                raise LayercritError(f"{folder / MANIFEST} holds {record['id']!r} trained with seed "
                                     f"{record.get('seed')}: a folder seedN holds members trained with --seed N")
            records.append({**record, "id": with_seed(record["id"], record["seed"]), "member": record["id"],
                            "file": f"{folder.name}/{record['file']}"})
    return records


def _manifest(folder: Path) -> list[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        raise LayercritError(
            f"no Fashion-MNIST zoo in {path.parent}: train one with 'layercrit zoo train --out DIR' and set "
            "LAYERCRIT_FMNIST_ZOO=DIR"
        )
    return yaml.safe_load(path.read_text())["models"]


def resolve(model_id: str, pretrained: bool = True, *, trust_checkpoint: bool = False) -> ResolvedModel:
    """Zoo member ``model_id`` as a :class:`ResolvedModel` (trained weights, or random init if not ``pretrained``).

    ``trust_checkpoint`` is accepted for the zoo interface and unused: the zoo ships safetensors.
    ``fresh`` builds randomly initialised networks of the same architecture (for the rerandomize reset);
    ``metadata`` carries the record's category, display name, accuracy, method and hyperparameters.
    """
    method, seed = method_and_seed(model_id)
    model_id = with_seed(method, seed)  # baseline@seed0 is baseline
    records = {record["id"]: record for record in entries(replicates=seed != 0)}
    if model_id not in records:
        close = difflib.get_close_matches(model_id, list(records), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LayercritError(f"no model {model_id!r} in the Fashion-MNIST zoo{hint}; see 'layercrit zoo list' "
                             "(seed replicates: 'layercrit zoo list --seeds')")
    record = records[model_id]
    module, pre = build_architecture(record["arch"], pretrained=False)
    if pretrained:
        path = zoo_dir() / record["file"]
        load_strict(module, _load_weights(path), source=str(path))
    resolved = wrap_module(module.eval(), lambda: build_architecture(record["arch"], pretrained=False)[0], pre,
                           spec=f"zoo:fmnist/{model_id}")
    resolved.metadata.update({key: record.get(key) for key in
                              ("category", "display", "accuracy", "method", "hyperparameters", "budget", "seed")})
    return resolved


def summary(records: Sequence[dict] | None = None) -> pd.DataFrame:
    """One row per member: training (epochs, images, minutes), clean test accuracy, the accuracy of a linear probe
    on its frozen features, and robust accuracy (PGD-10) at its own adversarial budget next to the baseline's at
    that budget. ``records``: manifest records (default: the zoo's)."""
    records = list(entries() if records is None else records)
    baseline = next((r for r in records if r.get("category") == "baseline"), {})
    rows = []
    for r in records:
        robust = r.get("robust_accuracy") or {}
        budget = r.get("budget")
        probe = r["accuracy"] if r["method"] in ("simclr", "frozen_random") else r.get("probe_accuracy")
        rows.append({
            "id": r["id"], "category": r.get("category"), "accuracy": r.get("accuracy"), "probe_accuracy": probe,
            "budget": budget, "robust_accuracy": robust.get(budget) if budget else None,
            "baseline_robust_accuracy": (baseline.get("robust_accuracy") or {}).get(budget) if budget else None,
            "epochs": r["hyperparameters"].get("epochs"), "train_images": r.get("train_images"),
            "train_min": round(r.get("train_time_s", float("nan")) / 60, 1), "seed": r.get("seed"),
            "precision": r["hyperparameters"].get("precision"),
        })
    table = pd.DataFrame(rows)
    numbers = ["epochs", "train_images", "train_min", "seed", "accuracy", "probe_accuracy", "robust_accuracy",
               "baseline_robust_accuracy"]
    table[numbers] = table[numbers].apply(pd.to_numeric)
    return table


def select_recipes(names: Sequence[str] | None, recipes: Sequence[dict] = RECIPES) -> list[dict]:
    """The recipes whose id, method or category is in ``names`` (all when ``names`` is empty), in zoo order."""
    if not names:
        return list(recipes)
    known = {value for recipe in recipes for value in (recipe["id"], recipe["method"], recipe["category"])}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise LayercritError(
            f"unknown zoo member {unknown[0]!r}: give ids, methods or categories from {', '.join(sorted(known))}"
        )
    return [r for r in recipes if {r["id"], r["method"], r["category"]} & set(names)]


def train_zoo(
    out_dir: str | Path,
    *,
    methods: Sequence[str] | None = None,
    recipes: Sequence[dict] = RECIPES,
    device: str | None = None,
    seed: int = 0,
    test_images: int | None = None,
    data_root: str | None = None,
    robust_images: int = 1000,
    precision: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Train the zoo members named by ``methods`` (ids, methods or categories; default all) into ``out_dir``.

    Resumable per member and per epoch: each finished member is written at once (``ID.safetensors``, then its
    record in ``manifest.yaml``, both atomically) and skipped by a later call with the same recipe and seed (unless
    ``force``); a member in training keeps its state after every epoch under ``.checkpoints/ID`` and a new call
    goes on from there, with the numbers an uninterrupted run gives. Records of members not retrained are kept.

    Args:
        out_dir: the zoo folder to write. recipes: the records to choose from (default :data:`RECIPES`).
        device: where to train (default: cuda when available). seed: model init, batch order, augmentation.
        test_images: evaluate on the first N Fashion-MNIST test images instead of all 10000.
        data_root: folder holding the Fashion-MNIST IDX files. log: receives one line per finished member.
        robust_images: the first N test images on which each member's robust accuracy is measured, under PGD-10 at
            every adversarial budget of the zoo (0: none).
        precision: train in this precision (``fp32``, ``bf16``) instead of the recipe's; the record's
            hyperparameters then say what was used and ``recipe_precision`` what the recipe asks for. bf16 pays only
            on a CPU with native bf16 (AMX): on an AVX2-only CPU it is emulated and 5x slower than fp32.

    Returns:
        The manifest records written in this call, one row per member.
    """
    chosen = [_in_precision(recipe, precision) for recipe in select_recipes(methods, recipes)]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = load_fashion_mnist("train", data_root)
    test_x, test_y = load_fashion_mnist("test", data_root)
    test_x, test_y = test_x[:test_images], test_y[:test_images]
    written = []
    done = {m["id"]: m for m in yaml.safe_load((out / MANIFEST).read_text())["models"]} if (out / MANIFEST).is_file() else {}
    for recipe in chosen:
        arch = recipe.get("arch", ARCH)
        if not force and _finished(done.get(recipe["id"]), recipe, seed, out):
            log(f"{recipe['id']:<16} already trained (same recipe and seed); --force to train it again")
            continue
        subset = torch.tensor(subset_indices(len(train_labels), recipe["train_images"], DATA_SEED))
        checkpoints = out / ".checkpoints" / file_name(recipe["id"])
        key = _training_key(recipe, seed, train_images[subset], train_labels[subset])
        problem = resume_problem(checkpoints, key)
        if problem and not force:
            raise LayercritError(f"zoo member {recipe['id']!r}: {problem}; --force discards it and trains the "
                                 "member from the start")
        if problem:
            log(f"{recipe['id']:<16} discarding its unfinished training (--force): {problem}")
            shutil.rmtree(checkpoints)
        with resumable(checkpoints, key) as clock:
            module, losses = train_member(recipe, train_images[subset], train_labels[subset], device=device,
                                          seed=seed)
        seconds, cpu_seconds = clock.total()  # over every run that trained this member, if it was resumed
        state = _storage(module.state_dict())
        module.load_state_dict(state)  # measure exactly the weights that are stored
        net = _wrapped(module, arch).to(device)
        record = {
            **copy.deepcopy(recipe), "arch": arch, "file": f"{file_name(recipe['id'])}.safetensors",
            "accuracy": round(accuracy(net, test_x, test_y, device=device), 2), "test_images": len(test_y),
            "seed": seed, "data_seed": DATA_SEED, "losses": [round(loss, 4) for loss in losses],
            "train_time_s": round(seconds, 1), "cpu_time_s": round(cpu_seconds, 1), "device": device,
            "threads": torch.get_num_threads(), "storage": str(STORAGE_DTYPE).removeprefix("torch."),
            "torch": str(torch.__version__), "platform": platform.machine(),
        }
        if recipe["method"] in ("supervised", "adversarial"):
            record["probe_accuracy"] = round(probe_accuracy(net, train_images[subset], train_labels[subset], test_x,
                                                            test_y, device=device, seed=seed), 2)
        if robust_images:
            record["robust_accuracy"] = {
                budget: round(robust_accuracy(net, test_x[:robust_images], test_y[:robust_images], norm=norm, eps=eps,
                                              device=device), 2)
                for budget, (norm, eps) in _budgets(recipes).items()}
            record["robust_attack"] = f"PGD-10 from a random start, step 2.5·eps/10, first {robust_images} test images"
        _save_weights(state, out / record["file"])
        _write_manifest(out, record)
        shutil.rmtree(checkpoints, ignore_errors=True)
        written.append(record)
        log(f"{record['id']:<16} {record['accuracy']:6.2f}%  {seconds:7.1f}s  ({record['display']})")
    return pd.DataFrame(written)


def probe_accuracy(net: Normalized, images: torch.Tensor, labels: torch.Tensor, test_x: torch.Tensor,
                   test_y: torch.Tensor, *, device: str = "cpu", seed: int = 0) -> float:
    """Test accuracy (percent) of a linear probe (:data:`PROBE`) on ``net``'s frozen features, trained on (images,
    labels): the supervised reference for the SimCLR and frozen-random members, whose classifier is such a probe."""
    probed = copy.deepcopy(net)
    train_linear_probe(probed, images, labels, device=device, seed=seed, **PROBE)
    return accuracy(probed, test_x, test_y, device=device)


def _in_precision(recipe: dict, precision: str | None) -> dict:
    """``recipe`` trained in ``precision`` (None: as it is); a recipe that trains nothing by SGD is unchanged."""
    if precision is None or "precision" not in recipe["hyperparameters"]:
        return recipe
    if precision not in PRECISIONS:
        raise LayercritError(f"unknown training precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == recipe["hyperparameters"]["precision"]:
        return recipe
    return {**recipe, "hyperparameters": {**recipe["hyperparameters"], "precision": precision},
            "recipe_precision": recipe["hyperparameters"]["precision"]}


def _finished(record: dict | None, recipe: dict, seed: int, out: Path) -> bool:
    """``record`` (from the manifest) is ``recipe`` trained with ``seed``, and its weights are there."""
    if record is None or record.get("seed") != seed or not (out / record.get("file", "")).is_file():
        return False
    return all(record.get(key) == value for key, value in copy.deepcopy(recipe).items())


def _training_key(recipe: dict, seed: int, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Everything that defines a member's training, kept with its checkpoints so that only the same training
    continues them: the recipe (architecture, hyperparameters), the seed, and the training images themselves."""
    data = hashlib.sha256(images.contiguous().numpy().tobytes())
    data.update(labels.contiguous().numpy().tobytes())
    return {"recipe": {**copy.deepcopy(recipe), "arch": recipe.get("arch", ARCH)}, "seed": seed,
            "data_seed": DATA_SEED, "data": data.hexdigest()[:16]}


def _budgets(recipes: Sequence[dict]) -> dict[str, tuple[str, float]]:
    """The adversarial budgets of the zoo's recipes: label ("linf 8/255") -> (norm, eps)."""
    return {r["budget"]: (r["hyperparameters"]["norm"], r["hyperparameters"]["eps"])
            for r in recipes if r["method"] == "adversarial"}


def train_member(
    recipe: dict, images: torch.Tensor, labels: torch.Tensor, *, device: str = "cpu", seed: int = 0
) -> tuple[nn.Module, list[float]]:
    """Train one recipe on (uint8 images, labels); returns the bare network in eval mode on the CPU and its losses."""
    torch.manual_seed(seed)
    module, _ = build_architecture(recipe.get("arch", ARCH), pretrained=False)
    net = _wrapped(module, recipe.get("arch", ARCH)).to(device)
    losses = METHODS[recipe["method"]](net, images, labels, device=device, seed=seed,
                                       **copy.deepcopy(recipe["hyperparameters"]))
    return net.model.eval().cpu(), losses


def _wrapped(module: nn.Module, arch: str) -> Normalized:
    _, pre = build_architecture(arch, pretrained=False)
    return Normalized(module, pre.mean, pre.std, pre.in_chans)


def _storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().to(STORAGE_DTYPE) if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in state.items()}


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise LayercritError(f"zoo weights missing: {path} (retrain with 'layercrit zoo train')")
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}


def _write_manifest(out: Path, record: dict) -> None:
    write_record(out, record, RECIPES, {"zoo": "fmnist"})
