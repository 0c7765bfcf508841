"""The ResNet-50 zoo of Gavrikov et al. 2024 (``zoo:paper/ID``): 51 models that differ only in how they were trained.

The records (id, display name, category, reported accuracy, weight source, input normalisation) and the
checkpoint layouts live in ``paper_r50.yaml`` beside this module; this module only reads them. Weights are
downloaded once into the torch hub cache (``<torch hub dir>/checkpoints``, where torchvision keeps its own),
checked against a sha256 prefix where one is known, remapped by their file's layout and loaded strictly: every
key of the architecture must come from the checkpoint, and nothing of the checkpoint may be left over.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import yaml
from torch import nn

from ..errors import LayercritError
from ..models import Preprocessing, ResolvedModel, _first_line, build_architecture, load_strict, wrap_module

ZOO = "paper"
REGISTRY = Path(__file__).with_name("paper_r50.yaml")
_GDRIVE = "https://drive.google.com/uc?id="
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch hub's file naming: NAME-<sha256 prefix>.EXT
_SOURCE_KINDS = ("timm", "torchvision", "weights")


@dataclass(frozen=True)
class Layout:
    """How a checkpoint file's keys map onto the architecture's (the ``layouts`` section of the registry).

    Applied in this order: descend into the first of ``key`` the checkpoint has; drop keys matching a ``drop``
    regex; remove the first matching ``strip`` prefix; apply each ``rename`` (regex, replacement) in turn.
    """

    name: str
    key: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    strip: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()

    def apply(self, checkpoint: object, *, source: str) -> dict[str, torch.Tensor]:
        """The state dict inside ``checkpoint`` (as read from ``source``) under the architecture's key names."""
        state = checkpoint
        for key in self.key:
            if isinstance(state, Mapping) and key in state:
                state = state[key]
                break
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LayercritError(
                f"{source} holds no state dict of tensors where layout {self.name!r} expects one "
                f"(under {' or '.join(self.key) or 'the top level'}): delete the file to download it again"
            )
        remapped: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            if any(re.search(pattern, name) for pattern in self.drop):
                continue
            new = self._rename(name)
            if new in remapped:
                raise LayercritError(f"layout {self.name!r} maps two keys of {source} onto {new!r}: fix its rules")
            remapped[new] = tensor
        return remapped

    def _rename(self, name: str) -> str:
        prefix = next((p for p in self.strip if name.startswith(p)), "")
        name = name[len(prefix):]
        for pattern, replacement in self.rename:
            name = re.sub(pattern, replacement, name)
        return name


@dataclass(frozen=True)
class WeightFile:
    """One file of a model's weights: where it comes from, its name in the cache, its checksum and layout."""

    url: str
    cache_name: str
    sha256: str | None
    layout: Layout

    @property
    def path(self) -> Path:
        """Where the file is (or will be) in the torch hub cache."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.cache_name


# ---------------------------------------------------------------- the registry


@functools.cache
def _registry() -> tuple[dict[str, dict], dict[str, Layout]]:
    data = yaml.safe_load(REGISTRY.read_text(encoding="utf-8"))
    layouts = {
        name: Layout(
            name=name,
            key=tuple(rules.get("key", ())),
            drop=tuple(rules.get("drop", ())),
            strip=tuple(rules.get("strip", ())),
            rename=tuple((pattern, replacement) for pattern, replacement in rules.get("rename", ())),
        )
        for name, rules in data["layouts"].items()
    }
    records: dict[str, dict] = {}
    for raw in data["models"]:
        record = {**data["defaults"], **raw}
        kinds = [kind for kind in _SOURCE_KINDS if kind in record]
        if len(kinds) != 1:
            raise LayercritError(f"{REGISTRY}: model {record['id']} needs exactly one of {', '.join(_SOURCE_KINDS)}")
        unknown = {f.get("layout", "plain") for f in record.get("weights", ())} - layouts.keys()
        if unknown:
            raise LayercritError(f"{REGISTRY}: model {record['id']} uses undefined layouts {sorted(unknown)}")
        if record["id"] in records:
            raise LayercritError(f"{REGISTRY}: model id {record['id']} appears twice")
        records[record["id"]] = record
    return records, layouts


def _record(model_id: str) -> dict:
    records, _ = _registry()
    if model_id not in records:
        close = difflib.get_close_matches(model_id, records, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LayercritError(
            f"unknown model {model_id!r} in zoo {ZOO}{hint}; list the ids with: layercrit zoo list --zoo {ZOO}"
        )
    return records[model_id]


def entries() -> list[dict]:
    """The zoo's models in the paper's order.

    Returns:
        one dict per model: ``id``, ``spec`` (``zoo:paper/ID``), ``display`` (the paper's name), ``category``,
        ``accuracy`` (the paper's ImageNet-1k top-1 in %, None where it reports none), ``budget`` (adversarial
        training's norm and ε, e.g. ``linf 4.0/255``; None for the others), ``arch``, ``source``,
        ``mean`` and ``std`` (the input normalisation the model expects on [0, 1] images).
    """
    return [_entry(record) for record in _registry()[0].values()]


def _entry(record: dict) -> dict:
    return {
        "id": record["id"],
        "spec": f"zoo:{ZOO}/{record['id']}",
        "display": record["display"],
        "category": record["category"],
        "accuracy": record["accuracy"],
        "budget": record.get("budget"),
        "arch": record["arch"],
        "source": _describe_source(record),
        "mean": tuple(float(m) for m in record["mean"]),
        "std": tuple(float(s) for s in record["std"]),
    }


def _describe_source(record: dict) -> str:
    if "timm" in record:
        return f"timm:{record['timm']}"
    if "torchvision" in record:
        return f"{record['arch']}:{record['torchvision']}"
    return " + ".join(
        f"hf:{f['hf']}/{f['file']}" if "hf" in f else f"gdrive:{f['gdrive']}" if "gdrive" in f else f["url"]
        for f in record["weights"]
    )


# ---------------------------------------------------------------- weight files


def weight_files(model_id: str) -> list[WeightFile]:
    """The files holding the trained weights of ``model_id``, in the order they are merged.

    ``file.path.is_file()`` tells whether a file is already in the cache (what a dry run reports as missing).
    """
    record = _record(model_id)
    kind = next(kind for kind in _SOURCE_KINDS if kind in record)
    return _FILES_OF_SOURCE[kind](record)


def _timm_files(record: dict) -> list[WeightFile]:
    import timm

    tag = record["timm"]
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None:
        raise LayercritError(f"this timm ({timm.__version__}) has no pretrained weights {tag}: upgrade timm")
    if cfg.url:  # timm names these files by their sha256 prefix, so the download can be checked
        return [_file_at(cfg.url)]
    url = f"{_hf_endpoint()}/{cfg.hf_hub_id}/resolve/main/model.safetensors"
    return [WeightFile(url=url, cache_name=f"{tag}.safetensors", sha256=None, layout=_registry()[1]["plain"])]


def _torchvision_files(record: dict) -> list[WeightFile]:
    import torchvision

    name = record["arch"].partition(":")[2]
    weights = torchvision.models.get_model_weights(name)[record["torchvision"]]
    return [_file_at(weights.url)]


def _listed_files(record: dict) -> list[WeightFile]:
    layouts = _registry()[1]
    files = []
    for spec in record["weights"]:
        cache_name = None
        if "hf" in spec:
            url = f"{_hf_endpoint()}/{spec['hf']}/resolve/{spec.get('revision', 'main')}/{spec['file']}"
        elif "gdrive" in spec:
            url = _GDRIVE + spec["gdrive"]
            cache_name = f"{record['id']}.pth"  # the name the paper's code caches it under
        else:
            url = spec["url"]
        files.append(WeightFile(
            url=url,
            cache_name=spec.get("cache_name") or cache_name or _url_name(url),
            sha256=spec.get("sha256"),
            layout=layouts[spec.get("layout", "plain")],
        ))
    return files


_FILES_OF_SOURCE: dict[str, Callable[[dict], list[WeightFile]]] = {
    "timm": _timm_files,
    "torchvision": _torchvision_files,
    "weights": _listed_files,
}


def _file_at(url: str) -> WeightFile:
    """A library's plain state-dict file, checked against the sha256 prefix in its name."""
    name = _url_name(url)
    match = _HASH_IN_NAME.search(name)
    return WeightFile(url=url, cache_name=name, sha256=match.group(1) if match else None,
                      layout=_registry()[1]["plain"])


def _url_name(url: str) -> str:
    return Path(urlparse(url).path).name


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


# ---------------------------------------------------------------- download, read, remap


def download(model_id: str) -> list[Path]:
    """Put the weight files of ``model_id`` into the torch hub cache (files already there are kept).

    Returns:
        the files' paths. Raises LayercritError naming the URL and the path to put the file in when a
        download fails (e.g. offline) or does not match its checksum.
    """
    return [_ensure(model_id, file) for file in weight_files(model_id)]


def _ensure(model_id: str, file: WeightFile) -> Path:
    path = file.path
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(file.url, path, file.sha256)
    except RuntimeError as error:  # torch.hub: "invalid hash value"; the bad download is not kept
        raise LayercritError(f"the download of {file.url} does not match its sha256 prefix {file.sha256} "
                             f"({_first_line(error)}): retry, or check whether the file changed upstream") from error
    except OSError as error:
        raise LayercritError(f"cannot download the weights of zoo:{ZOO}/{model_id} ({_first_line(error)}); "
                             f"offline, download {file.url} to {path}") from error
    return path


def _fetch(url: str, path: Path, sha256: str | None) -> None:
    """Download ``url`` to ``path``; the file appears only once complete (and matching ``sha256`` when given)."""
    if not url.startswith(_GDRIVE):
        torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256)
        return
    try:
        import gdown
    except ImportError:
        raise OSError("Google Drive downloads need gdown: pip install gdown") from None
    partial = path.with_name(path.name + ".partial")
    try:
        done = gdown.download(id=url.removeprefix(_GDRIVE), output=str(partial), quiet=False)
    except Exception as error:  # noqa: BLE001 - gdown raises its own types for quota and permission pages
        raise OSError(f"gdown: {_first_line(error)}") from error
    if not done or not partial.is_file():
        raise OSError("gdown could not fetch the file")
    os.replace(partial, path)


def _read(path: Path, url: str, trust_checkpoint: bool) -> object:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as error:  # noqa: BLE001 - any unreadable cached file is reported the same way
        if "Unsupported global" in str(error):  # torch's weights_only unpickler met a Python object
            raise LayercritError(
                f"{path} holds pickled Python objects besides its weights: if you trust {url}, resolve it with "
                "trust_checkpoint=True"
            ) from error
        raise LayercritError(f"cannot read {path} ({_first_line(error)}): delete it to download {url} again") from error


def load_weights(model_id: str, *, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The trained state dict of ``model_id`` under the architecture's key names.

    Downloads missing files into the torch hub cache, reads each (``weights_only`` unless ``trust_checkpoint``),
    remaps it by its layout and merges the files (e.g. a self-supervised trunk and its linear classifier).
    """
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(model_id):
        path = _ensure(model_id, file)
        part = file.layout.apply(_read(path, file.url, trust_checkpoint), source=str(path))
        overlap = sorted(state.keys() & part.keys())
        if overlap:
            raise LayercritError(f"{path} repeats keys of an earlier file of {model_id}: {', '.join(overlap[:4])}")
        state.update(part)
    return state


# ---------------------------------------------------------------- the zoo's door


def resolve(model_id: str, pretrained: bool = True, *, trust_checkpoint: bool = False) -> ResolvedModel:
    """Build model ``model_id`` of the paper's zoo.

    Args:
        model_id: an id of :func:`entries` (e.g. ``robust_resnet50_l2_eps3``).
        pretrained: load the trained weights (downloading them once); False gives the randomly initialised
            architecture without touching the network (tests, dry runs).
        trust_checkpoint: allow weight files holding pickled Python objects.

    Returns:
        a :class:`ResolvedModel` whose ``fresh`` builds randomly initialised instances of the same architecture
        (timm's or torchvision's ResNet-50, as the paper's code does for that model) and whose ``metadata``
        holds the record (display, category, accuracy, source, ...).
    """
    record = _record(model_id)
    arch = record["arch"]

    def fresh() -> nn.Module:
        return build_architecture(arch, pretrained=False)[0]

    module = fresh()
    if pretrained:
        load_strict(module, load_weights(model_id, trust_checkpoint=trust_checkpoint), source=f"zoo:{ZOO}/{model_id}")
    entry = _entry(record)
    pre = Preprocessing(mean=entry["mean"], std=entry["std"],
                        source=f"the paper's 256/224 transform, the normalisation {model_id} was trained with")
    resolved = wrap_module(module.eval(), fresh=fresh, preprocessing=pre, spec=entry["spec"])
    resolved.metadata.update(entry, zoo=ZOO, pretrained=pretrained)
    return resolved
