"""Model specs → models: the one door in, for every kind of spec (the model sources of :mod:`layercrit.models` and
the zoos of :mod:`layercrit.zoo`).

One function, :func:`resolve_model`, turns a spec string into a :class:`ResolvedModel`: the trained model
(wrapped so that it takes images in [0, 1] and normalises them itself, as the paper's code does), a factory for
fresh randomly initialised instances of the same architecture, and the preprocessing the model expects.

Specs:
    timm:NAME[.TAG]                 timm model, pretrained weights through timm (``pretrained=False`` for random init)
    hf-hub:ORG/NAME[@REVISION]      a timm model on the Hugging Face Hub, as ``timm.create_model("hf-hub:...")``
    torchvision:NAME[:WEIGHTS]      torchvision model, weights enum name (default: DEFAULT)
    layercrit:NAME                  an architecture bundled with layercrit (e.g. the Fashion-MNIST ResNet)
    MODULE:FACTORY, FILE.py:FACTORY the user's own factory (imported: it runs that code), see :func:`load_factory`
    zoo:ZOO/ID                      a model from a registered zoo (``zoo:fmnist/baseline``, ``zoo:lm/baseline``, ...)
    hf:ORG/NAME[@REVISION], hf:DIR  a transformers model (causal LM, image or sequence classifier), see
                                    :mod:`layercrit.models.hf`; ``dtype`` sets its weights' dtype
    path/to/ckpt.(pth|pt|safetensors|bin)   a checkpoint, with ``arch=`` one of the architecture specs above

Weights that are not cached are fetched through :mod:`layercrit.hub`, which fails in seconds when offline.
"""


from __future__ import annotations

from dataclasses import replace

import torch

from . import zoo
from .errors import LayercritError
from .models.base import ResolvedModel, finish, match_mean_to_channels, model_seed
from .models.builders import build_architecture, names_code
from .models.checkpoints import infer_head_and_stem, load_state_dict, load_strict, looks_like_checkpoint


def resolve_model(
    spec: str,
    *,
    arch: str | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    seed: int | None = None,
    model_id: str | None = None,
    dtype: str = "float32",
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
                                 trust_checkpoint=trust_checkpoint, dtype=dtype)
    if spec.startswith("hf:"):
        from .models.hf import resolve_hf

        if arch is not None:
            raise LayercritError(f"--arch is only for checkpoint files; {spec} names its architecture in its config")
        return resolve_hf(spec, pretrained=pretrained, dtype=dtype)
    if spec.startswith("zoo:"):
        return zoo.resolve(spec, pretrained=pretrained, trust_checkpoint=trust_checkpoint)
    if looks_like_checkpoint(spec):
        if arch is None:
            raise LayercritError(
                f"checkpoint {spec} needs an architecture: pass --arch timm:NAME or --arch torchvision:NAME"
            )
        return _resolve_checkpoint(spec, arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    if arch is not None:
        raise LayercritError(f"--arch is only for checkpoint files, but the model spec {spec!r} is not a file")
    module, pre = build_architecture(spec, pretrained=pretrained, num_classes=num_classes, allow_code=True)
    return finish(module, pre, spec,
                   lambda: build_architecture(spec, pretrained=False, num_classes=num_classes, allow_code=True)[0])


def runs_code(spec: str, *, arch: str | None = None, trust_checkpoint: bool = False) -> list[str]:
    """What :func:`resolve_model` with these arguments would run as Python code, decided without running it:
    ``spec`` or ``arch`` naming a factory (``MODULE:FACTORY``, ``FILE.py:FACTORY``), and ``trust_checkpoint``
    (unpickling a checkpoint's objects runs their code). Empty when it runs none."""
    found = []
    if not spec.startswith("zoo:") and not looks_like_checkpoint(spec) and names_code(spec):
        found.append(f"spec {spec!r}")
    if arch is not None and names_code(arch):
        found.append(f"arch {arch!r}")
    if trust_checkpoint:
        found.append("trust_checkpoint (unpickling runs code)")
    return found


def _resolve_checkpoint(path: str, arch: str, *, num_classes: int | None, trust_checkpoint: bool) -> ResolvedModel:
    state = load_state_dict(path, trust_checkpoint=trust_checkpoint)
    probe, _ = build_architecture(arch, pretrained=False, num_classes=num_classes, allow_code=True)
    inferred_classes, inferred_chans = infer_head_and_stem(probe, state)
    if num_classes is None:
        num_classes = inferred_classes
    module, pre = build_architecture(
        arch, pretrained=False, num_classes=num_classes, in_chans=inferred_chans if inferred_chans != 3 else None,
        allow_code=True,
    )
    load_strict(module, state, source=path)
    pre = match_mean_to_channels(replace(pre, in_chans=inferred_chans or pre.in_chans))
    fresh = lambda: build_architecture(  # noqa: E731
        arch, pretrained=False, num_classes=num_classes, in_chans=inferred_chans if inferred_chans != 3 else None,
        allow_code=True,
    )[0]
    resolved = finish(module, pre, path, fresh)
    resolved.metadata["arch"] = arch
    return resolved
