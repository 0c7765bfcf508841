"""Text → fixed windows of token ids: the evaluation set of a language model.

Specs (``load_data(spec, tokenizer=...)``):
    python-stdlib                   held-out modules of the running Python's standard library (:data:`EVAL_MODULES`;
                                    the language-model zoo never trained on them)
    FILE.txt                        the file's text
    FILE.jsonl                      one JSON object per line; its ``text_field`` (default ``text``) is a document
    hf-dataset:REPO[/CONFIG][:SPLIT]  a Hugging Face dataset's ``text_field`` column (REPO as the Hub names it,
                                    e.g. ``Salesforce/wikitext/wikitext-2-raw-v1:test``; split default ``test``),
                                    through the ``datasets`` library (offline: a one-line error unless cached)
In Python, the data may also be a list of texts, or a tensor of token ids (N windows × T tokens).

The documents, each followed by the tokenizer's end-of-text token, make one token stream, which is cut into
consecutive windows of ``seq_len`` tokens (the last, incomplete one is dropped); the windows measured are a seeded
subset of them (:func:`~layercrit.data.evalset.subset_indices`, as for images). The stream is cached on disk, keyed
by the text and the tokenizer, so a second run does not tokenize again.

The evaluation set holds ``{"input_ids", "attention_mask"}`` (N × T) as its inputs; its labels are -1 (no class):
a language model's truth is the next token of every window.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import hub
from ..errors import LayercritError
from .evalset import EvalSet, subset_indices

log = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".jsonl")
STDLIB = "python-stdlib"
TRAIN_MODULES = (
    "_pydecimal", "turtle", "inspect", "typing", "pydoc", "tarfile", "doctest", "argparse", "_pyio", "pickletools",
    "subprocess", "difflib", "locale", "enum", "mailbox", "ipaddress", "pickle", "pdb", "ast", "optparse",
    "dataclasses", "threading", "shutil", "configparser", "imaplib", "ssl", "smtplib", "platform", "traceback",
    "os", "functools", "socket", "codecs", "ftplib", "bdb", "random", "zipimport", "ntpath", "_collections_abc",
    "tempfile", "pstats", "trace", "dis", "plistlib", "uuid", "socketserver", "contextlib", "tokenize",
    "_strptime", "webbrowser", "pkgutil", "pprint", "gzip", "modulefinder", "profile", "mimetypes", "site",
    "wave", "weakref", "gettext", "warnings", "compileall",
)
"""Standard-library modules (``NAME.py`` in the stdlib folder) the tokenizer and the models are trained on."""
EVAL_MODULES = ("statistics", "fractions", "heapq", "textwrap", "base64", "calendar")
"""Held-out modules: every member's perplexity, and the demo's evaluation windows."""


def stdlib_dir() -> Path:
    """The running Python's standard-library folder (where the corpus is read)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(split: str) -> list[str]:
    """The source texts of the ``train`` or ``eval`` modules, in the fixed order of the module lists."""
    names = {"train": TRAIN_MODULES, "eval": EVAL_MODULES}.get(split)
    if names is None:
        raise LayercritError(f"unknown corpus split {split!r}: train or eval")
    root = stdlib_dir()
    missing = [n for n in names if not (root / f"{n}.py").is_file()]
    if missing:
        raise LayercritError(f"the standard library in {root} lacks {', '.join(m + '.py' for m in missing)}")
    return [(root / f"{n}.py").read_text(encoding="utf-8") for n in names]


def is_text_spec(spec) -> bool:
    """Whether a data spec names text (a ``.txt``/``.jsonl`` file or an ``hf-dataset:``), or is a list of texts."""
    if isinstance(spec, list | tuple):
        return bool(spec) and all(isinstance(t, str) for t in spec)
    return isinstance(spec, str | Path) and (str(spec).startswith("hf-dataset:") or str(spec) == STDLIB
                                             or Path(spec).suffix.lower() in TEXT_SUFFIXES)


def token_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Consecutive, non-overlapping windows of ``seq_len`` tokens of the 1-D stream ``ids`` (N × seq_len; the
    incomplete tail is dropped)."""
    if seq_len < 2:
        raise LayercritError(f"seq_len must be at least 2 (a token and the next one to predict), got {seq_len}")
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len).clone()


def load_text(
    spec: str | Path | Sequence[str] | torch.Tensor,
    tokenizer,
    *,
    seq_len: int = 128,
    windows: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> EvalSet:
    """The evaluation set of ``windows`` windows (all when fewer or None) of ``seq_len`` tokens of ``spec``.

    Args:
        spec: a text spec (module docstring), a list of texts, or token ids N × T (taken as the windows).
        tokenizer: the model's tokenizer (a transformers tokenizer; not needed for token ids).
        seq_len: tokens per window. windows: how many windows (a seeded subset). seed: the subset's seed.
        text_field: the JSON key / dataset column holding the text.
        cache_dir: where the token stream is cached (default: ``$LAYERCRIT_CACHE``, ``~/.cache/layercrit``).
    """
    if isinstance(spec, torch.Tensor):
        if spec.ndim != 2 or spec.is_floating_point():
            raise LayercritError(f"token ids must be N windows × T tokens of integers, got {tuple(spec.shape)} "
                                 f"{spec.dtype}")
        all_windows, source = spec.long(), f"token ids {tuple(spec.shape)}"
        seq_len = spec.shape[1]
    else:
        if tokenizer is None:
            raise LayercritError("text data needs the model's tokenizer: use an hf: or zoo:lm/ model (or pass "
                                 "token ids)")
        texts, source = _read_texts(spec, text_field)
        all_windows = token_windows(token_stream(texts, tokenizer, cache_dir if use_cache else None), seq_len)
    if not len(all_windows):
        raise LayercritError(f"{source} gives fewer than seq_len={seq_len} tokens: no window to "
                             f"measure; give more text or lower seq_len={seq_len}")
    chosen = subset_indices(len(all_windows), windows, seed)
    ids = all_windows[chosen]
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:10]
    data_id = f"{Path(str(source)).name[:40]}-w{len(ids)}x{seq_len}-s{seed}-{digest}"
    description = f"{source}: {len(ids)} windows of {seq_len} tokens (seed {seed}) of {len(all_windows)}"
    return EvalSet(images={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                   labels=torch.full((len(ids),), -1, dtype=torch.long), data_id=data_id, description=description)


def _read_texts(spec, text_field: str) -> tuple[list[str], str]:
    if isinstance(spec, list | tuple):
        if not all(isinstance(t, str) for t in spec):
            raise LayercritError("data as a list must be a list of texts (str)")
        return list(spec), f"{len(spec)} texts"
    spec = str(spec)
    if spec == STDLIB:
        return stdlib_corpus("eval"), f"{STDLIB} (held-out modules {', '.join(EVAL_MODULES)} of {stdlib_dir()})"
    if spec.startswith("hf-dataset:"):
        return _hf_dataset(spec.removeprefix("hf-dataset:"), text_field), spec
    path = Path(spec)
    if not path.is_file():
        raise LayercritError(f"data not found: {spec} (give a .txt or .jsonl file, or hf-dataset:NAME)")
    if path.suffix.lower() == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")], spec
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise LayercritError(f"{spec} line {number} is not JSON ({error.msg}): give one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise LayercritError(f"{spec} line {number} has no text field {text_field!r}: pass the key holding the "
                                 "text as text_field=KEY")
        texts.append(record[text_field])
    return texts, spec


def _hf_dataset(body: str, text_field: str) -> list[str]:
    name, _, split = body.partition(":")
    repo, config = _dataset_repo(name)
    cached = (Path(hub.hf_cache()) / ("datasets--" + repo.replace("/", "--"))).is_dir()
    reason = ("HF_HUB_OFFLINE is set" if hub.hub_offline() else
              None if hub.reachable(hub.hf_endpoint()) else "huggingface.co does not answer (offline?)")
    if reason and not cached:
        raise LayercritError(f"cannot download hf-dataset:{body}: {reason}; on a machine that is online run `hf "
                             f"download --repo-type dataset {repo}` and copy its datasets--{repo.replace('/', '--')} "
                             f"folder into {hub.hf_cache()}")
    try:
        import datasets
    except ImportError as error:
        raise LayercritError("hf-dataset: data needs the datasets library: pip install datasets") from error
    if reason:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    table = datasets.load_dataset(repo, config or None, split=split or "test")
    if text_field not in table.column_names:
        raise LayercritError(f"hf-dataset:{body} has no column {text_field!r} (columns: "
                             f"{', '.join(table.column_names)}): pass the text column as text_field")
    return [t for t in table[text_field] if t]


def _dataset_repo(name: str) -> tuple[str, str]:
    """``NAME``, ``ORG/NAME`` or ``ORG/NAME/CONFIG`` → (repo, config): the repo as the Hub names it, then the
    config (``hf-dataset:Salesforce/wikitext/wikitext-2-raw-v1:test``)."""
    parts = name.split("/")
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}", parts[2]
    return name, ""


def token_stream(texts: Sequence[str], tokenizer, cache_dir: str | Path | None = None) -> torch.Tensor:
    """Every text's tokens followed by eos, as one 1-D stream (cached under ``cache_dir`` when given)."""
    eos = tokenizer.eos_token_id
    key = hashlib.sha256()
    key.update(_tokenizer_fingerprint(tokenizer).encode())
    for text in texts:
        key.update(hashlib.sha256(text.encode()).digest())
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "text" / f"{key.hexdigest()[:32]}.pt"
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except (OSError, RuntimeError) as error:
                log.warning("token cache %s unreadable (%s): tokenizing again", path, error)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.long)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(stream, tmp)
            os.replace(tmp, path)
        except OSError as error:
            log.warning("cannot write the token cache %s (%s): going on without it", path, error)
    return stream


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()
