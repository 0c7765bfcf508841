"""Model specs → models.

One function, :func:`resolve_model`, turns a spec string into a :class:`ResolvedModel`: the trained model
(wrapped so that it takes images in [0, 1] and normalises them itself, as the paper's code does), a factory for
fresh randomly initialised instances of the same architecture, and the preprocessing the model expects.

Specs:
    timm:NAME[.TAG]                 timm model, pretrained weights through timm (``pretrained=False`` for random init)
    hf-hub:ORG/NAME[@REVISION]      a timm model on the Hugging Face Hub, as ``timm.create_model("hf-hub:...")``
    torchvision:NAME[:WEIGHTS]      torchvision model, weights enum name (default: DEFAULT)
    layercrit:NAME                  an architecture bundled with layercrit (e.g. the Fashion-MNIST ResNet)
    MODULE:FACTORY, FILE.py:FACTORY the user's own factory (imported: it runs that code), see :func:`load_factory`
    zoo:ZOO/ID                      a model from a registered zoo (``zoo:fmnist/baseline``, ``zoo:paper/...``)
    path/to/ckpt.(pth|pt|safetensors|bin)   a checkpoint, with ``arch=`` one of the architecture specs above

Weights that are not cached are fetched through :mod:`layercrit.hub`, which fails in seconds when offline.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import hub
from .errors import LayercritError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model input: resize shorter side → center crop → [0, 1] → normalise (in the model).

    ``resize``/``crop`` of None leave the images at their native size (e.g. 28×28 Fashion-MNIST).
    """

    resize: int | None = 256
    crop: int | None = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3
    source: str = "standard ImageNet eval transform"

    def describe(self) -> str:
        size = "native size" if self.crop is None else f"Resize({self.resize}) -> CenterCrop({self.crop})"
        return f"{size}, {self.interpolation}, mean={self.mean}, std={self.std} ({self.source})"


class Normalized(nn.Module):
    """Takes images in [0, 1] and normalises them before the wrapped model, so layer names read ``model.*``."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], in_chans: int = 3):
        super().__init__()
        self.model = model
        self.in_chans = in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_chans == 3:  # greyscale data into an RGB model
            x = x.expand(-1, 3, -1, -1)
        return self.model((x - self.mean) / self.std)


@dataclass
class ResolvedModel:
    """A trained model ready to measure, plus what is needed to reset its layers and feed it."""

    model: nn.Module
    fresh: Callable[[], nn.Module] | None
    preprocessing: Preprocessing
    spec: str
    num_classes: int
    metadata: dict = field(default_factory=dict)


def resolve_model(
    spec: str,
    *,
    arch: str | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    seed: int | None = None,
    model_id: str | None = None,
) -> ResolvedModel:
    """Resolve a model spec (see the module docstring) into a :class:`ResolvedModel` in eval mode.

    With ``seed``, the model is built with torch's RNG seeded by (seed, ``model_id``, default the spec), so a random
    init (``pretrained=False``, or a new head) is the same in every process, run and sweep; the caller's RNG state
    is left as it was.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed(seed, model_id or spec))
            return resolve_model(spec, arch=arch, pretrained=pretrained, num_classes=num_classes,
                                 trust_checkpoint=trust_checkpoint)
    if spec.startswith("zoo:"):
        from . import zoo

        return zoo.resolve(spec, pretrained=pretrained, trust_checkpoint=trust_checkpoint)
    if _looks_like_checkpoint(spec):
        if arch is None:
            raise LayercritError(
                f"checkpoint {spec} needs an architecture: pass --arch timm:NAME or --arch torchvision:NAME"
            )
        return _resolve_checkpoint(spec, arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    if arch is not None:
        raise LayercritError(f"--arch is only for checkpoint files, but the model spec {spec!r} is not a file")
    module, pre = build_architecture(spec, pretrained=pretrained, num_classes=num_classes, allow_code=True)
    return _finish(module, pre, spec,
                   lambda: build_architecture(spec, pretrained=False, num_classes=num_classes, allow_code=True)[0])


def model_seed(seed: int, model_id: str) -> int:
    """The torch seed a model is built under (see :func:`resolve_model`): the same for (seed, id) everywhere."""
    digest = hashlib.sha256(f"layercrit-model:{seed}:{model_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


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
    if source not in _ARCHITECTURE_SOURCES and is_code_spec(arch):
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


def wrap_module(
    model: nn.Module,
    fresh: Callable[[], nn.Module] | None = None,
    preprocessing: Preprocessing | None = None,
    spec: str = "python:nn.Module",
) -> ResolvedModel:
    """Wrap a user's ``nn.Module`` (and optional factory for fresh instances) for measuring."""
    pre = preprocessing or Preprocessing(source="given by the caller")
    return _finish(model, pre, spec, fresh)


def _finish(
    module: nn.Module, pre: Preprocessing, spec: str, fresh_bare: Callable[[], nn.Module] | None
) -> ResolvedModel:
    def wrap(m: nn.Module) -> nn.Module:
        return Normalized(m, pre.mean, pre.std, pre.in_chans).eval()

    fresh = (lambda: wrap(fresh_bare())) if fresh_bare is not None else None
    return ResolvedModel(
        model=wrap(module), fresh=fresh, preprocessing=pre, spec=spec, num_classes=_num_classes(module)
    )


def _num_classes(module: nn.Module) -> int:
    if getattr(module, "num_classes", None):
        return int(module.num_classes)
    last = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if last:
        return last[-1].out_features
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else 0


# ---------------------------------------------------------------- architecture sources


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
            raise LayercritError(f"timm could not build {name!r}: {_first_line(error)}") from error
        raise LayercritError(
            f"cannot load pretrained weights for timm:{name} ({_first_line(error)}); put them in the Hugging Face "
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
        raise LayercritError(f"cannot build hf-hub:{repo} (timm {arch_name}): {_first_line(error)}") from error
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
        raise LayercritError(f"cannot read the config of hf-hub:{repo}: {_first_line(error)}") from error


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
    return _match_mean_to_channels(pre)


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
            f"cannot load torchvision weights {weights} ({_first_line(error)}); offline, download {weights.url} "
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


# ---------------------------------------------------------------- the user's own code


def is_code_spec(spec: str) -> bool:
    """Whether ``spec`` reads as ``MODULE:FACTORY`` (an importable module) or ``FILE.py:FACTORY``."""
    location, _, attr = spec.rpartition(":")
    if not location or not all(part.isidentifier() for part in attr.split(".")):
        return False
    if location.endswith(".py"):
        return True
    if not all(part.isidentifier() for part in location.split(".")):
        return False
    return importlib.util.find_spec(location.partition(".")[0]) is not None  # a typo'd source stays "unknown spec"


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable ``FACTORY`` of ``MODULE:FACTORY`` or ``path/to/FILE.py:FACTORY`` (dotted attributes allowed).

    This imports, and so runs, that code: only name code you trust. A file's folder is put on ``sys.path`` first,
    so that it can import its neighbours as it would when run as a script.
    """
    location, _, attr = spec.rpartition(":")
    if location.endswith(".py"):
        module = _import_file(Path(location), spec)
    else:
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
    in_chans = kwargs.get("in_chans") or (convs[0].in_channels if convs else 3)
    pre = Preprocessing(in_chans=in_chans, source=f"standard 256/224 transform, ImageNet mean/std ({spec} sets no "
                        "pretrained_cfg)")
    return model.eval(), _match_mean_to_channels(pre)


def _match_mean_to_channels(pre: Preprocessing) -> Preprocessing:
    if len(pre.mean) != pre.in_chans and pre.in_chans == 1:
        return replace(pre, mean=(sum(pre.mean) / len(pre.mean),), std=(sum(pre.std) / len(pre.std),))
    return pre


# ---------------------------------------------------------------- checkpoints


def _looks_like_checkpoint(spec: str) -> bool:
    return spec.endswith(CHECKPOINT_SUFFIXES) or os.path.isfile(spec)


def load_state_dict(path: str | Path, *, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict: unwraps ``state_dict``/``model``/... and strips ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise LayercritError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error here
        if "Unsupported global" in str(error):  # torch's weights-only unpickler met a Python object
            raise LayercritError(f"checkpoint {path} holds pickled Python objects besides its weights: pass "
                                 "--trust-checkpoint if you trust its source") from error
        raise LayercritError(f"cannot read checkpoint {path}: not a PyTorch or safetensors file, or corrupt "
                             f"({type(error).__name__})") from error
    for key in _STATE_DICT_KEYS:
        while isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping | nn.Module):
            state = state[key]
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LayercritError(f"checkpoint {path} holds no state dict of tensors")
    prefix = "module."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _resolve_checkpoint(path: str, arch: str, *, num_classes: int | None, trust_checkpoint: bool) -> ResolvedModel:
    state = load_state_dict(path, trust_checkpoint=trust_checkpoint)
    probe, _ = build_architecture(arch, pretrained=False, num_classes=num_classes, allow_code=True)
    inferred_classes, inferred_chans = _infer_head_and_stem(probe, state)
    if num_classes is None:
        num_classes = inferred_classes
    module, pre = build_architecture(
        arch, pretrained=False, num_classes=num_classes, in_chans=inferred_chans if inferred_chans != 3 else None,
        allow_code=True,
    )
    load_strict(module, state, source=path)
    pre = _match_mean_to_channels(replace(pre, in_chans=inferred_chans or pre.in_chans))
    fresh = lambda: build_architecture(  # noqa: E731
        arch, pretrained=False, num_classes=num_classes, in_chans=inferred_chans if inferred_chans != 3 else None,
        allow_code=True,
    )[0]
    resolved = _finish(module, pre, path, fresh)
    resolved.metadata["arch"] = arch
    return resolved


def _infer_head_and_stem(probe: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """Number of classes and input channels as the checkpoint has them (its last Linear, its first conv)."""
    linears = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)]
    classes = chans = None
    if linears and f"{linears[-1]}.weight" in state:
        classes = int(state[f"{linears[-1]}.weight"].shape[0])
    if convs and f"{convs[0]}.weight" in state:
        chans = int(state[f"{convs[0]}.weight"].shape[1])
    return classes, chans


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load every key or fail with a message listing what is missing, unexpected or of the wrong shape."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label}: {', '.join(keys[:4])}{more}")
        raise LayercritError(
            f"checkpoint {source} does not match the architecture: {'; '.join(parts)} "
            "(check --arch, or remap the keys)"
        )
    module.load_state_dict(state, strict=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
