"""The language-model zoo: one tiny GPT-2 trained on Python's standard library with different methods.

The corpus is one every machine with Python has: the source (code, comments and docstrings) of a fixed list of
standard-library modules (:data:`~layercrit.data.text.TRAIN_MODULES`), with held-out modules
(:data:`~layercrit.data.text.EVAL_MODULES`, the data spec ``python-stdlib``) for perplexity. A
byte-level BPE tokenizer of :data:`VOCAB` tokens is trained on the training modules, then every member (:data:`RECIPES`)
is the same GPT-2 (:data:`ARCH`) trained from the same seed on the same windows, differing only in training method.

:func:`train_zoo` writes one ``save_pretrained`` folder per member (``config.json``, float16 ``model.safetensors``,
the tokenizer) plus ``manifest.yaml`` with each member's held-out perplexity, training time and the Python version
whose standard library it read (other versions' sources differ a little, so their perplexities do too). The package
ships such a folder (``layercrit zoo train lm --out DIR``, copied into ``src/layercrit/zoo/lm``); set
``LAYERCRIT_LM_ZOO=DIR`` to use one you trained. Members resolve as ``zoo:lm/ID`` (and as ``hf:FOLDER``).
"""

from __future__ import annotations

import copy
import difflib
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
import yaml

from ..data.text import stdlib_corpus, stdlib_dir, token_stream, token_windows
from ..errors import LayercritError
from ..models.base import ResolvedModel
from ._manifest import MANIFEST, write_record

VOCAB = 2048
SEQ_LEN = 64  # tokens per window (the model predicts the last 63 from their prefixes)
ARCH = {"model_type": "gpt2", "n_layer": 6, "n_embd": 128, "n_head": 4, "n_positions": SEQ_LEN,
        "activation_function": "gelu"}



def _recipe(member_id: str, display: str, **hyperparameters) -> dict:
    base = {"steps": 250, "batch_size": 16, "lr": 3e-3, "warmup": 25, "weight_decay": 0.0, "dropout": 0.0,
            "precision": "fp32"}
    return {"id": member_id, "method": "causal_lm", "display": display, "arch": dict(ARCH),
            "hyperparameters": {**base, **hyperparameters}}


RECIPES: list[dict] = [
    _recipe("baseline", "Baseline (AdamW, 250 steps)"),
    _recipe("longer", "Longer training (500 steps)", steps=500),
    _recipe("regularized", "Dropout 0.1 + weight decay 0.1", dropout=0.1, weight_decay=0.1),
]
"""How each member is trained: everything but the hyperparameters named in ``display`` is the same."""


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB):
    """A byte-level BPE tokenizer (GPT-2 style, ``<|endoftext|>`` as eos) trained on ``texts``."""
    from ..models.hf import transformers

    tf = transformers()
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=SEQ_LEN)


def build_model(arch: dict, vocab_size: int, *, dropout: float = 0.0):
    """A randomly initialised GPT-2 of ``arch`` (the current torch RNG draws its weights)."""
    from ..models.hf import transformers

    tf = transformers()
    config = tf.GPT2Config(vocab_size=vocab_size, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=0, eos_token_id=0, **{k: v for k, v in arch.items() if k != "model_type"})
    return tf.GPT2LMHeadModel(config)


def zoo_dir() -> Path:
    """The folder the zoo is read from: ``$LAYERCRIT_LM_ZOO`` or the one shipped in the package."""
    return Path(os.environ.get("LAYERCRIT_LM_ZOO") or Path(__file__).with_name("lm"))


def entries() -> list[dict]:
    """The manifest records of the trained zoo (recipe plus ``perplexity``, ``folder``, ``train_time_s``, ...)."""
    path = zoo_dir() / MANIFEST
    if not path.is_file():
        raise LayercritError(f"no language-model zoo in {path.parent}: train one with 'layercrit zoo train lm "
                             "--out DIR' and set LAYERCRIT_LM_ZOO=DIR")
    return yaml.safe_load(path.read_text())["models"]


def summary() -> pd.DataFrame:
    """One row per member: held-out perplexity, steps, dropout, weight decay and training minutes."""
    return pd.DataFrame([{
        "id": r["id"], "perplexity": r["perplexity"], "steps": r["hyperparameters"]["steps"],
        "dropout": r["hyperparameters"]["dropout"], "weight_decay": r["hyperparameters"]["weight_decay"],
        "train_min": round(r["train_time_s"] / 60, 1), "display": r["display"],
    } for r in entries()])


def resolve(model_id: str, pretrained: bool = True, *, trust_checkpoint: bool = False) -> ResolvedModel:
    """Zoo member ``model_id`` as a :class:`ResolvedModel` (its ``save_pretrained`` folder through ``hf:``)."""
    from ..models.hf import resolve_hf

    records = {record["id"]: record for record in entries()}
    if model_id not in records:
        close = difflib.get_close_matches(model_id, list(records), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LayercritError(f"no model {model_id!r} in the language-model zoo{hint}; see 'layercrit zoo list lm'")
    record = records[model_id]
    resolved = resolve_hf(str(zoo_dir() / record["folder"]), pretrained=pretrained, dtype="float32")
    resolved.metadata.update({key: record.get(key) for key in ("display", "perplexity", "method", "hyperparameters")})
    resolved.metadata["category"] = record["id"]
    return resolved


def train_zoo(
    out_dir: str | Path,
    *,
    methods: Sequence[str] | None = None,
    recipes: Sequence[dict] = RECIPES,
    device: str | None = None,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Train the members named by ``methods`` (ids; default all) into ``out_dir``, resumable as the image zoo.

    The tokenizer is trained first (``out_dir/tokenizer``, once); each member is written at once as a
    ``save_pretrained`` folder ``out_dir/ID`` (float16 weights; its perplexity is that of the stored weights) and
    its record in ``manifest.yaml``; a member in training keeps its state every 25 steps under ``.checkpoints/ID``.

    Returns:
        The manifest records written in this call, one row per member.
    """
    from ..training import resumable
    from ..training_lm import fit_causal_lm, perplexity

    known = [r["id"] for r in recipes]
    unknown = [m for m in methods or () if m not in known]
    if unknown:
        raise LayercritError(f"unknown language-model zoo member {unknown[0]!r}: one of {', '.join(known)}")
    chosen = [r for r in recipes if not methods or r["id"] in methods]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out / "tokenizer")
    train = token_windows(token_stream(stdlib_corpus("train"), tokenizer), SEQ_LEN)
    held_out = token_windows(token_stream(stdlib_corpus("eval"), tokenizer), SEQ_LEN)
    done = {m["id"]: m for m in yaml.safe_load((out / MANIFEST).read_text())["models"]} if (out / MANIFEST).is_file() else {}
    written = []
    for recipe in chosen:
        if not force and _finished(done.get(recipe["id"]), recipe, seed, out):
            log(f"{recipe['id']:<12} already trained (same recipe and seed); --force to train it again")
            continue
        hp = copy.deepcopy(recipe["hyperparameters"])
        torch.manual_seed(seed)
        model = build_model(recipe["arch"], len(tokenizer), dropout=hp.pop("dropout")).to(device)
        checkpoints = out / ".checkpoints" / recipe["id"]
        with resumable(checkpoints) as clock:
            losses = fit_causal_lm(model, train, seed=seed, **hp)
        seconds, cpu_seconds = clock.total()
        model = model.cpu().half().float()  # measure exactly the weights that are stored
        record = {
            **copy.deepcopy(recipe), "folder": recipe["id"], "perplexity": round(perplexity(model, held_out), 3),
            "eval_windows": len(held_out), "train_windows": len(train), "seq_len": SEQ_LEN, "vocab": len(tokenizer),
            "seed": seed, "losses": [round(loss, 4) for loss in losses], "train_time_s": round(seconds, 1),
            "cpu_time_s": round(cpu_seconds, 1), "device": device, "threads": torch.get_num_threads(),
            "storage": "float16", "python": platform.python_version(), "torch": str(torch.__version__),
            "corpus": "Python standard library source: TRAIN_MODULES (train), EVAL_MODULES (held out)",
        }
        _save_member(model, tokenizer, out / recipe["id"])
        _write_manifest(out, record)
        shutil.rmtree(checkpoints, ignore_errors=True)
        written.append(record)
        log(f"{recipe['id']:<12} perplexity {record['perplexity']:8.3f}  {seconds:7.1f}s  ({record['display']})")
    return pd.DataFrame(written)


def eval_windows(tokenizer, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """The held-out modules as consecutive windows of ``seq_len`` tokens of ``tokenizer``."""
    return token_windows(token_stream(stdlib_corpus("eval"), tokenizer), seq_len)


def _tokenizer(folder: Path):
    from ..models.hf import transformers

    if not (folder / "tokenizer.json").is_file():
        train_tokenizer(stdlib_corpus("train")).save_pretrained(folder)
    return transformers().AutoTokenizer.from_pretrained(folder)


def _finished(record: dict | None, recipe: dict, seed: int, out: Path) -> bool:
    if record is None or record.get("seed") != seed or not (out / record["folder"] / "config.json").is_file():
        return False
    return all(record.get(key) == value for key, value in copy.deepcopy(recipe).items())


def _save_member(model, tokenizer, folder: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    model.half().save_pretrained(tmp)
    model.float()
    tokenizer.save_pretrained(tmp)
    tmp.chmod(0o755)  # mkdtemp's folders and files are the owner's alone; a zoo is read by everyone
    for path in tmp.iterdir():
        path.chmod(0o644)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _write_manifest(out: Path, record: dict) -> None:
    write_record(out, record, RECIPES, {"zoo": "lm", "python_stdlib": str(stdlib_dir()), "python": sys.version.split()[0]})
