"""Hugging Face transformers models: ``hf:ORG/NAME[@REVISION]`` (the Hub) and ``hf:FOLDER`` (``save_pretrained``).

The config's architecture decides the Auto class: causal language models (``...ForCausalLM``, ``...LMHeadModel``),
image classifiers (``...ForImageClassification``) and sequence classifiers (``...ForSequenceClassification``).
A language model or sequence classifier comes with its tokenizer (:attr:`ResolvedModel.tokenizer`); an image
classifier takes images in [0, 1] and normalises them itself (the image processor's mean and std), as every image
model here. transformers is an optional dependency (``pip install 'layercrit[lm]'``), imported only here.

Offline, a model that is not in the Hugging Face cache is a one-line error naming what to download and where
(instantly with ``HF_HUB_OFFLINE=1``), as for ``timm:`` models (:mod:`layercrit.hub`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import hub
from ..errors import LayercritError
from .base import Normalized, Preprocessing, ResolvedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = {  # config.architectures suffix -> (kind, the Auto class's name)
    "ForCausalLM": ("causal-lm", "AutoModelForCausalLM"),
    "LMHeadModel": ("causal-lm", "AutoModelForCausalLM"),
    "ForImageClassification": ("image-classification", "AutoModelForImageClassification"),
    "ForSequenceClassification": ("sequence-classification", "AutoModelForSequenceClassification"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def transformers():
    """The transformers module, or the one-line error saying how to install it."""
    try:
        import transformers as module
    except ImportError as error:
        raise LayercritError("hf: models need transformers: pip install 'layercrit[lm]' (transformers, "
                             "tokenizers)") from error
    # progress bars and notes (such as "sequence longer than the model's maximum", which windows never are) would
    # fill the terminal and break one-line errors
    module.utils.logging.disable_progress_bar()
    module.utils.logging.set_verbosity_error()
    return module


def resolve_hf(source: str, *, pretrained: bool = True, dtype: str = "float32") -> ResolvedModel:
    """``source``: a ``save_pretrained`` folder or a Hub repo ``ORG/NAME[@REVISION]`` (with or without ``hf:``).

    Args:
        pretrained: the trained weights (False: the architecture with random weights, from its config).
        dtype: the weights' dtype, ``float32`` (default), ``bfloat16`` or ``float16``.

    Returns:
        A :class:`ResolvedModel` in eval mode; ``metadata["kind"]`` is ``causal-lm``, ``image-classification`` or
        ``sequence-classification``. ``fresh`` is None for language models and sequence classifiers: the
        rerandomize reset then initialises a copy of the target module alone with the model's ``_init_weights``;
        for an image classifier (in its normalising wrapper) it builds the architecture with new weights.
    """
    tf = transformers()
    source = source.removeprefix("hf:")
    if dtype not in DTYPES:
        raise LayercritError(f"dtype={dtype!r}: one of {', '.join(DTYPES)}")
    local = Path(source).is_dir()
    if not local and (source.count("/") > 1 or not source or source.startswith((".", "/"))):
        raise LayercritError(f"hf:{source} is neither a folder nor a Hub repo ORG/NAME[@REVISION]")
    repo, _, revision = source.partition("@")
    where = source if local else repo
    options = {"revision": revision} if revision and not local else {}
    with _access(source, local, ["config.json"]):
        config = tf.AutoConfig.from_pretrained(where, **options)
    kind, auto = _kind(config, source)
    auto_class = getattr(tf, auto)
    if pretrained:
        with _access(source, local, ["config.json"], WEIGHT_FILES):
            model = auto_class.from_pretrained(where, dtype=DTYPES[dtype], **options)
    else:
        model = auto_class.from_config(config, dtype=DTYPES[dtype])
    model.eval()

    def fresh() -> torch.nn.Module:
        return auto_class.from_config(config, dtype=DTYPES[dtype]).eval()

    # rerandomize then initialises a copy of each target alone (the model's _init_weights), not a whole model
    fresh_factory = None

    tokenizer, pre = None, Preprocessing(resize=None, crop=None, source="token ids (no image preprocessing)")
    if kind == "image-classification":
        pre = _image_preprocessing(tf, source, where, local, options)
        model = Normalized(model, pre.mean, pre.std, pre.in_chans).eval()
        fresh_factory = lambda: Normalized(fresh(), pre.mean, pre.std, pre.in_chans).eval()  # noqa: E731
    else:
        with _access(source, local, ["tokenizer_config.json"]):
            tokenizer = tf.AutoTokenizer.from_pretrained(where, **options)
    num_classes = config.vocab_size if kind == "causal-lm" else config.num_labels
    return ResolvedModel(model=model, fresh=fresh_factory, preprocessing=pre, spec=f"hf:{source}", num_classes=num_classes,
                         metadata={"kind": kind, "dtype": dtype, "architecture": type(config).__name__},
                         tokenizer=tokenizer)


def _kind(config, source: str) -> tuple[str, str]:
    for architecture in config.architectures or ():
        for suffix, kind in KINDS.items():
            if architecture.endswith(suffix):
                return kind
    names = ", ".join(config.architectures or ["none"])
    raise LayercritError(f"hf:{source} is a {names}: layercrit measures causal language models, image "
                         "classifiers and sequence classifiers (config.architectures ...ForCausalLM, "
                         "...ForImageClassification, ...ForSequenceClassification)")


def _access(source: str, local: bool, *files):
    import contextlib

    if local:
        return contextlib.nullcontext()
    return hub.access(f"hf:{source}", hub.hf_download(source, [list(f) if isinstance(f, tuple) else f
                                                                for f in files]))


def _image_preprocessing(tf, source: str, where: str, local: bool, options: dict) -> Preprocessing:
    with _access(source, local, ["preprocessor_config.json"]):
        processor = tf.AutoImageProcessor.from_pretrained(where, **options)
    side = _side(processor.size, "shortest_edge") or _side(processor.size, "height")
    crop_side = (_side(processor.crop_size, "height") if getattr(processor, "do_center_crop", False) else None) or side
    mean = tuple(processor.image_mean) if getattr(processor, "do_normalize", True) else (0.0,) * 3
    std = tuple(processor.image_std) if getattr(processor, "do_normalize", True) else (1.0,) * 3
    return Preprocessing(resize=int(side), crop=int(crop_side), mean=mean, std=std, in_chans=len(mean),
                         source=f"the image processor of hf:{source}")


def _side(size, key: str) -> int | None:
    """One side of an image processor's size (an int, a dict, or transformers 5's ``SizeDict``)."""
    if size is None or isinstance(size, int):
        return size
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def window_length(model: torch.nn.Module, seq_len: int | None = None) -> int:
    """Tokens per window of text for ``model``: ``seq_len``, by default its context (at most 128); a window longer
    than the context the model was built for is refused (its position embeddings end there)."""
    context = context_length(model)
    if seq_len is None:
        return min(128, context or 128)
    if context is not None and seq_len > context:
        raise LayercritError(f"seq_len={seq_len} is longer than the model's context of {context} tokens: give "
                             f"seq_len={context} or less")
    return seq_len


def context_length(model: torch.nn.Module) -> int | None:
    """The most tokens a language model takes at once (its config's position count), or None when unknown."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
