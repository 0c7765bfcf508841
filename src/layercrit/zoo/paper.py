"""The ResNet-50 zoo of Gavrikov et al. 2024 (``zoo:paper/ID``): 51 models that differ only in how they were trained.

The records (id, display name, category, reported accuracy, weight source, input normalisation) and the
checkpoint layouts live in ``paper_r50.yaml`` beside this module; this module only reads them. Weights are
downloaded once into the torch hub cache (``<torch hub dir>/checkpoints``, where torchvision keeps its own),
checked against a sha256 prefix where one is known, remapped by their file's layout and loaded strictly: every
key of the architecture must come from the checkpoint, and nothing of the checkpoint may be left over.

Downloads (``pip install -e '.[paper]'`` brings gdown for the Google Drive files) are retried with back-off,
resume where an interrupted one stopped (``NAME.partial`` beside the target: an HTTP Range request; gdown's
``resume``; huggingface_hub's own incomplete files), and land in the cache only once complete and checked. Files on
the Hugging Face Hub are fetched with ``huggingface_hub.hf_hub_download`` (its cache, token, ``HF_ENDPOINT`` and
offline mode) and linked into the torch hub cache.
"""

from __future__ import annotations

import difflib
import errno
import functools
import hashlib
import http.client
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import yaml
from torch import nn

from ..errors import LayercritError, first_line
from ..models.base import Preprocessing, ResolvedModel, wrap_module
from ..models.builders import build_architecture
from ..models.checkpoints import load_strict

ZOO = "paper"
REGISTRY = Path(__file__).with_name("paper_r50.yaml")
_GDRIVE = "https://drive.google.com/uc?id="
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch hub's file naming: NAME-<sha256 prefix>.EXT
_SOURCE_KINDS = ("timm", "torchvision", "weights")
ATTEMPTS = 4  # tries of one download before giving up
RETRY_WAIT = 2.0  # seconds before the second try, doubled for each further one


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
    hub: tuple[str, str, str] | None = None  # (repo, file, revision) on the Hugging Face Hub

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
    hub = (cfg.hf_hub_id, "model.safetensors", "main")
    return [WeightFile(url=_hub_url(*hub), cache_name=f"{tag}.safetensors", sha256=None,
                       layout=_registry()[1]["plain"], hub=hub)]


def _torchvision_files(record: dict) -> list[WeightFile]:
    import torchvision

    name = record["arch"].partition(":")[2]
    weights = torchvision.models.get_model_weights(name)[record["torchvision"]]
    return [_file_at(weights.url)]


def _listed_files(record: dict) -> list[WeightFile]:
    layouts = _registry()[1]
    files = []
    for spec in record["weights"]:
        cache_name, hub = None, None
        if "hf" in spec:
            hub = (spec["hf"], spec["file"], spec.get("revision", "main"))
            url = _hub_url(*hub)
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
            hub=hub,
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


def _hub_url(repo: str, file: str, revision: str) -> str:
    """Where a Hub file is, for messages (it is fetched with hf_hub_download)."""
    return f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo}/resolve/{revision}/{file}"


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
        _fetch(file, path)
    except _ChecksumMismatch as error:  # the bad download is not kept
        raise LayercritError(f"the download of {file.url} does not match its sha256 prefix {file.sha256} "
                             f"({first_line(error)}): retry, or check whether the file changed upstream") from error
    except OSError as error:
        raise LayercritError(f"cannot download the weights of zoo:{ZOO}/{model_id} ({first_line(error)}); "
                             f"offline, download {file.url} to {path}") from error
    return path


class _ChecksumMismatch(Exception):
    pass


def _fetch(file: WeightFile, path: Path) -> None:
    """Download ``file`` to ``path``, trying :data:`ATTEMPTS` times and resuming; the file appears only once
    complete and matching its sha256 prefix (when one is known)."""
    partial = path.with_name(path.name + ".partial")
    fetch = _from_hub if file.hub else _from_drive if file.url.startswith(_GDRIVE) else _from_url
    for attempt in range(ATTEMPTS):
        try:
            fetch(file, partial)
            break
        except _Permanent as error:
            raise OSError(str(error)) from error
        except (OSError, http.client.HTTPException) as error:  # a dropped connection, a timeout, a 5xx
            if attempt == ATTEMPTS - 1:
                raise OSError(f"{first_line(error)} (after {ATTEMPTS} tries)") from error
            time.sleep(RETRY_WAIT * 2**attempt)
    digest = _sha256(partial)
    if file.sha256 and not digest.startswith(file.sha256):
        partial.unlink()
        raise _ChecksumMismatch(f"its sha256 is {digest[:len(file.sha256)]}...")
    os.replace(partial, path)


class _Permanent(Exception):
    """A failure that another try cannot fix (404, 403, a missing package)."""


def _from_url(file: WeightFile, partial: Path) -> None:
    """Continue ``partial`` from where it stopped with an HTTP Range request (start over when the server
    ignores it)."""
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "layercrit", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(file.url, headers=headers), timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left to send: the partial file is whole
            return
        if 400 <= error.code < 500 and error.code not in (408, 429):
            raise _Permanent(f"HTTP {error.code} {error.reason}") from error
        raise
    except urllib.error.URLError as error:
        if isinstance(error.reason, (socket.gaierror, ConnectionRefusedError)) or \
                getattr(error.reason, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            raise _Permanent(first_line(error)) from error  # offline: waiting will not bring the network
        raise
    resumed = have and getattr(response, "status", None) == 206
    with response, open(partial, "ab" if resumed else "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
        expected = response.headers.get("Content-Length")
        if expected is not None and out.tell() < int(expected) + (have if resumed else 0):
            raise http.client.IncompleteRead(b"", int(expected))  # the connection closed early


def _from_drive(file: WeightFile, partial: Path) -> None:
    try:
        import gdown
    except ImportError:
        raise _Permanent("Google Drive downloads need gdown: pip install -e '.[paper]' (or pip install gdown)") from None
    try:
        done = gdown.download(id=file.url.removeprefix(_GDRIVE), output=str(partial), quiet=False, resume=True)
    except Exception as error:  # noqa: BLE001 - gdown raises its own types for quota and permission pages
        raise OSError(f"gdown: {first_line(error)}") from error
    if not done or not partial.is_file():
        raise OSError("gdown could not fetch the file")


def _from_hub(file: WeightFile, partial: Path) -> None:
    """hf_hub_download into the Hugging Face cache (which resumes its own incomplete files), then a link (or a copy,
    across file systems) to ``partial``."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, name, revision = file.hub
    try:
        cached = hf_hub_download(repo, name, revision=revision)
    except LocalEntryNotFoundError as error:  # not cached, and the Hub not reachable
        if constants.HF_HUB_OFFLINE:  # asked to stay offline: another try cannot help
            raise _Permanent(first_line(error)) from error
        raise OSError(first_line(error)) from error
    except (EntryNotFoundError, RepositoryNotFoundError) as error:
        raise _Permanent(f"{repo}/{name}: {first_line(error)}") from error
    partial.unlink(missing_ok=True)
    try:
        os.link(cached, partial)
    except OSError:
        shutil.copyfile(cached, partial)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        raise LayercritError(f"cannot read {path} ({first_line(error)}): delete it to download {url} again") from error


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
