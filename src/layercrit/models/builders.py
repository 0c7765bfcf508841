"""Architecture specs -> bare networks: timm, hf-hub, torchvision, layercrit's own, and the user's factories."""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import hub
from ..errors import LayercritError, first_line
from .base import Preprocessing, match_mean_to_channels


def build_architecture(
    arch: str, *, pretrained: bool, num_classes: int | None = None, in_chans: int | None = None,
    allow_code: bool = False,
) -> tuple[nn.Module, Preprocessing]:
    """Build the bare network named by an architecture spec (``timm:``, ``hf-hub:``, ``torchvision:``,
    ``layercrit:``, or with ``allow_code`` a Python factory ``MODULE:FACTORY`` / ``FILE.py:FACTORY``).

    ``allow_code`` is for specs the user named (command line, API, their sweep config): a factory spec imports and
    runs that code, so one read from a file the user did not write (a zoo manifest) is refused.
    """
    source, _, name = arch.partition(":")
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if names_code(arch):
        if not allow_code:
            raise LayercritError(f"{arch!r} names Python code, which layercrit imports only from a spec you give "
                                 "yourself (--model/--arch, measure(), your sweep config)")
        return _python(arch, pretrained, kwargs)
    if not name or source not in _ARCHITECTURE_SOURCES:
        raise LayercritError(
            f"unknown model spec {arch!r}{_bare_name_hint(arch)}: use timm:NAME, hf-hub:ORG/NAME, "
            "torchvision:NAME[:WEIGHTS], layercrit:NAME, zoo:ZOO/ID, MODULE:FACTORY, FILE.py:FACTORY or a "
            "checkpoint path (.pth/.pt/.safetensors) with --arch"
        )
    return _ARCHITECTURE_SOURCES[source](name, pretrained, kwargs)


def _bare_name_hint(spec: str) -> str:
    """`` (did you mean timm:resnet50?)`` for a name without its source that a library knows."""
    if ":" in spec or not spec:
        return ""
    import timm

    if timm.is_model(spec.partition(".")[0]):
        return f" (did you mean timm:{spec}?)"
    import torchvision

    return f" (did you mean torchvision:{spec}?)" if spec in torchvision.models.list_models() else ""


def _timm(name: str, pretrained: bool, kwargs: dict) -> tuple[nn.Module, Preprocessing]:
    import timm

    if name.startswith("hf-hub:"):  # timm's own spelling, timm:hf-hub:ORG/NAME
        return _hf_hub(name.removeprefix("hf-hub:"), pretrained, kwargs)
    arch_name, _, tag = name.partition(".")
    if not timm.is_model(arch_name):
        close = difflib.get_close_matches(arch_name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LayercritError(f"unknown timm model {name!r}{hint}; list them with timm.list_models()")
    cfg = _timm_pretrained_cfg(arch_name, tag)
    try:
        if pretrained:
            with hub.access(f"the weights of timm:{name}", _timm_download(cfg, arch_hint=f"timm:{name}")):
                model = timm.create_model(name, pretrained=True, **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        if not pretrained:
            raise LayercritError(f"timm could not build {name!r}: {first_line(error)}") from error
        raise LayercritError(
            f"cannot load pretrained weights for timm:{name} ({first_line(error)}); put them in the Hugging Face "
            f"cache ({hub.hf_cache()}) or pass the file as --model FILE --arch timm:{arch_name}"
        ) from error
    return model.eval(), _timm_preprocessing(model, name, kwargs)


def _timm_pretrained_cfg(arch_name: str, tag: str):
    """timm's pretrained config of ``arch_name.tag`` (its default tag when ``tag`` is empty); an unknown tag is
    refused, listing the known ones."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(f"{arch_name}.{tag}" if tag else arch_name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{arch_name}.*")]
        close = difflib.get_close_matches(tag, tags, n=3)
        listing = ", ".join(close or tags[:8]) + (f" ({len(tags)} in all)" if len(tags) > len(close or tags[:8]) else "")
        raise LayercritError(
            f"timm has no pretrained weights {arch_name}.{tag}: the tags of {arch_name} are "
            f"{listing or 'none'}; see timm.list_pretrained('{arch_name}.*')"
        ) from None


def _timm_download(cfg, *, arch_hint: str) -> hub.Download:
    """Where timm will fetch the weights of pretrained config ``cfg`` from (the Hub first, as timm does)."""
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise LayercritError(f"{arch_hint} has no pretrained weights in timm: pass --no-pretrained for a random "
                             f"init, or a checkpoint as --model FILE --arch {arch_hint}")
    if cfg.hf_hub_id:
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else hub.HF_WEIGHT_FILES
        return hub.hf_download(cfg.hf_hub_id, [files], arch_hint=arch_hint)
    return hub.url_download(cfg.url, arch_hint=arch_hint)


def _hf_hub(repo: str, pretrained: bool, kwargs: dict) -> tuple[nn.Module, Preprocessing]:
    """A timm model pushed to the Hugging Face Hub (``hf-hub:ORG/NAME[@REVISION]``): its config.json names the
    architecture and pretrained config. The config is read once per process, so fresh instances need no network."""
    import timm

    pretrained_cfg, arch_name, model_args = _hf_hub_config(repo)
    build = {**model_args, **kwargs}
    try:
        if pretrained:
            with hub.access(f"the weights of hf-hub:{repo}", hub.hf_download(repo, [hub.HF_WEIGHT_FILES])):
                model = timm.create_model(arch_name, pretrained=True, pretrained_cfg=dict(pretrained_cfg),
                                          pretrained_model_args=dict(model_args), **build)
        else:
            model = timm.create_model(arch_name, pretrained=False, pretrained_cfg=dict(pretrained_cfg), **build)
    except (RuntimeError, OSError, ValueError) as error:
        raise LayercritError(f"cannot build hf-hub:{repo} (timm {arch_name}): {first_line(error)}") from error
    return model.eval(), _timm_preprocessing(model, f"hf-hub:{repo}", kwargs)


@functools.cache
def _hf_hub_config(repo: str) -> tuple[dict, str, dict]:
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
    from timm.models import load_model_config_from_hf

    login = "for a private repo set HF_TOKEN or run `hf auth login` (huggingface-cli login)"
    try:
        with hub.access(f"the config of hf-hub:{repo}", hub.hf_download(repo, [["config.json"]])):
            return load_model_config_from_hf(repo)
    except GatedRepoError as error:
        raise LayercritError(f"hf-hub:{repo} is gated: accept its terms on {hub.hf_endpoint()}/{repo.partition('@')[0]}, "
                             f"then {login}") from error
    except RepositoryNotFoundError as error:
        raise LayercritError(f"no Hugging Face repo {repo.partition('@')[0]} (or it is private): check the name; "
                             f"{login}") from error
    except EntryNotFoundError as error:
        raise LayercritError(f"hf-hub:{repo} has no config.json: not a timm model repo (timm's push_to_hf_hub "
                             "writes one); for other weights pass the file as --model FILE --arch timm:NAME") from error
    except (OSError, ValueError) as error:
        raise LayercritError(f"cannot read the config of hf-hub:{repo}: {first_line(error)}") from error


def _timm_preprocessing(model: nn.Module, name: str, kwargs: dict) -> Preprocessing:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    in_chans = int(cfg["input_size"][0]) if "in_chans" not in kwargs else int(kwargs["in_chans"])
    if crop == 224:
        # The paper (and torchvision's reference eval) use Resize(256) -> CenterCrop(224) for every 224 model.
        pre = Preprocessing(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), in_chans=in_chans,
                            source=f"standard 256/224 transform, timm pretrained_cfg mean/std for {name}")
    else:
        pre = Preprocessing(
            resize=int(crop / cfg.get("crop_pct", 0.875)),
            crop=crop,
            interpolation=cfg.get("interpolation", "bilinear"),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            in_chans=in_chans,
            source=f"timm pretrained_cfg of {name} (input {crop}px)",
        )
    return match_mean_to_channels(pre)


def _torchvision(name: str, pretrained: bool, kwargs: dict) -> tuple[nn.Module, Preprocessing]:
    import torchvision

    arch_name, _, weights_name = name.partition(":")
    available = torchvision.models.list_models()
    if arch_name not in available:
        close = difflib.get_close_matches(arch_name, available, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LayercritError(f"unknown torchvision model {arch_name!r}{hint}")
    kwargs = dict(kwargs)
    in_chans = kwargs.pop("in_chans", 3)
    weights = None
    if pretrained:
        enum = torchvision.models.get_model_weights(arch_name)
        try:
            weights = enum[weights_name or "DEFAULT"]
        except KeyError:
            names = ", ".join(w.name for w in enum)
            raise LayercritError(f"unknown weights {weights_name!r} for torchvision:{arch_name}; one of {names}") from None
        if "num_classes" in kwargs and kwargs["num_classes"] != len(weights.meta["categories"]):
            weights = None  # a checkpoint with another head: architecture only, the file brings the weights
    try:
        model = torchvision.models.get_model(arch_name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as error:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name if weights else "?"
        raise LayercritError(
            f"cannot load torchvision weights {weights} ({first_line(error)}); offline, download {weights.url} "
            f"to {path}"
        ) from error
    pre = Preprocessing(in_chans=in_chans, source="standard 256/224 transform, ImageNet mean/std")
    return model.eval(), pre


def _builtin(name: str, pretrained: bool, kwargs: dict) -> tuple[nn.Module, Preprocessing]:
    from .architectures import ARCHITECTURES

    if name not in ARCHITECTURES:
        raise LayercritError(f"unknown layercrit architecture {name!r}; one of {', '.join(sorted(ARCHITECTURES))}")
    if pretrained:
        raise LayercritError(
            f"layercrit:{name} is an architecture without weights: use a zoo model (layercrit zoo list) "
            f"or --model CKPT --arch layercrit:{name}"
        )
    builder, pre = ARCHITECTURES[name]
    return builder(**kwargs).eval(), pre


_ARCHITECTURE_SOURCES: dict[str, Callable[[str, bool, dict], tuple[nn.Module, Preprocessing]]] = {
    "timm": _timm,
    "hf-hub": _hf_hub,
    "torchvision": _torchvision,
    "layercrit": _builtin,
}


def is_code_spec(spec: str) -> bool:
    """Whether ``spec`` reads as ``MODULE:FACTORY`` (an importable module) or ``FILE.py:FACTORY``."""
    location, _, attr = spec.rpartition(":")
    if not location or not all(part.isidentifier() for part in attr.split(".")):
        return False
    if location.endswith(".py"):
        return True
    if not all(part.isidentifier() for part in location.split(".")):
        return False
    path = list(sys.path)
    try:  # looked up as an import would find it (the current folder first), leaving sys.path as it was
        _current_folder_first()
        return importlib.util.find_spec(location.partition(".")[0]) is not None  # a typo'd source: "unknown spec"
    finally:
        sys.path[:] = path


def _current_folder_first() -> None:
    """Modules import from the current folder first, as ``python -m`` has them (``mynets:build`` is ./mynets.py)."""
    here = os.getcwd()
    if not sys.path or sys.path[0] not in ("", here):
        sys.path.insert(0, here)
def names_code(arch: str) -> bool:
    """Whether building the architecture spec ``arch`` imports Python code (a factory spec, not a library's
    model); decided without importing anything."""
    return arch.partition(":")[0] not in _ARCHITECTURE_SOURCES and is_code_spec(arch)


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable ``FACTORY`` of ``MODULE:FACTORY`` or ``path/to/FILE.py:FACTORY`` (dotted attributes allowed).

    This imports, and so runs, that code: only name code you trust. A file's folder is put on ``sys.path`` first,
    so that it can import its neighbours as it would when run as a script.
    """
    location, _, attr = spec.rpartition(":")
    if location.endswith(".py"):
        module = _import_file(Path(location), spec)
    else:
        _current_folder_first()
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as error:
            if error.name is None or not location.startswith(error.name):
                raise  # the user's module imports something missing: their traceback says where
            raise LayercritError(f"cannot import {location} (from {spec}): no module {error.name}; install it "
                                 "or add its folder to PYTHONPATH") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise LayercritError(f"{location} has no {attr!r} (from {spec}); it has "
                                 f"{', '.join(n for n in dir(module) if not n.startswith('_'))[:200]}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise LayercritError(f"{spec} is a {type(factory).__name__}, not a function or class that builds a model")
    return factory


def _import_file(path: Path, spec: str):
    path = path.resolve()
    if not path.is_file():
        raise LayercritError(f"no Python file {path} (from {spec})")
    name = f"layercrit_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name not in sys.modules:
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _python(spec: str, pretrained: bool, kwargs: dict) -> tuple[nn.Module, Preprocessing]:
    """A model from the user's factory. ``pretrained`` is passed when the factory takes it (as timm's
    ``create_model`` does); ``num_classes``/``in_chans`` (read from a checkpoint) only when it takes them."""
    factory = load_factory(spec)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C extension: call it bare
        parameters = {}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    call = {k: v for k, v in kwargs.items() if k in parameters or open_ended}
    if "pretrained" in parameters or open_ended:
        call["pretrained"] = pretrained
    elif pretrained:
        raise LayercritError(
            f"{spec} takes no 'pretrained' argument, so it builds untrained models: give the trained weights as "
            f"--model CKPT --arch {spec} (measure(CKPT, arch=...)), pass --no-pretrained, or let it take "
            "pretrained=True/False"
        )
    model = factory(**call)
    if not isinstance(model, nn.Module):
        raise LayercritError(f"{spec} returned a {type(model).__name__}, not a torch nn.Module")
    if getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None):
        return model.eval(), _timm_preprocessing(model, spec, kwargs)  # timm's convention, read by timm
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    in_chans = kwargs.get("in_chans") or (convs[0].in_channels if convs else 0)  # 0: not known, fed as they are
    # No config, no normalisation it did not ask for: a model trained on images in [0, 1] gets them so (ImageNet's
    # mean/std would silently move its accuracy); --mean/--std give the normalisation it was trained with.
    pre = Preprocessing(mean=(0.0,) * max(in_chans, 1), std=(1.0,) * max(in_chans, 1), in_chans=in_chans,
                        source=f"{spec} sets no pretrained_cfg: give --mean/--std if it was trained on normalised "
                        "images")
    return model.eval(), pre
