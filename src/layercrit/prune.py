"""Depth pruning: write a transformers model without some of its blocks, and its perplexity before and after.

``layercrit prune --model hf:... --drop 3,5 --out DIR`` is :func:`prune`: the model loses the blocks (config and
layer indices updated, :func:`layercrit.models.blocks.drop_blocks`), is written with ``save_pretrained`` (plus its
tokenizer) and read back from ``DIR`` by transformers, and both models' perplexity is measured on the same
evaluation windows (default: the held-out standard-library modules, ``python-stdlib``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LayercritError


@dataclass(frozen=True)
class PruneResult:
    out: Path
    dropped: list[int]
    blocks_before: int
    container: str
    perplexity_before: float
    perplexity_after: float
    data: str  # the evaluation windows' description


def prune(
    model: str,
    drop: str | list[int],
    out: str | Path,
    *,
    data: str = "python-stdlib",
    seq_len: int | None = None,
    windows: int | None = 64,
    seed: int = 0,
    text_field: str = "text",
    dtype: str = "float32",
    device: str = "cpu",
    force: bool = False,
) -> PruneResult:
    """Write ``model`` (an ``hf:`` or ``zoo:lm/`` causal LM) without blocks ``drop`` (``"3,5"``, ``"2-4"``) to
    ``out`` and measure the perplexity of both on ``windows`` windows of ``seq_len`` tokens (default: the model's
    context, at most 128) of ``data`` (``text_field``: a .jsonl's key holding the text). ``force`` replaces an existing ``out``."""
    from .data.text import load_text
    from .models.blocks import drop_blocks, find_blocks, parse_blocks
    from .models.hf import transformers, window_length
    from .resolve import resolve_model
    from .training_lm import perplexity

    target = Path(out)
    if target.exists() and any(target.iterdir()) and not force:
        raise LayercritError(f"out={str(target)!r} exists and is not empty: choose another folder or pass force=True")
    resolved = resolve_model(model, dtype=dtype)
    if resolved.metadata.get("kind") != "causal-lm":
        raise LayercritError(f"model={model!r} is not a causal language model (hf: ...ForCausalLM, or zoo:lm/ID): "
                             "prune reports perplexity, which needs one")
    lm = resolved.model.to(device)
    blocks = find_blocks(lm)
    dropped = parse_blocks(drop, len(blocks))
    seq_len = window_length(lm, seq_len)
    evalset = load_text(data, resolved.tokenizer, seq_len=seq_len, windows=windows, seed=seed, text_field=text_field)
    ids, mask = evalset.images["input_ids"], evalset.images["attention_mask"]
    before = perplexity(lm, ids, mask)
    drop_blocks(lm, dropped)
    tmp = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None, prefix=".prune."))
    try:
        lm.save_pretrained(tmp)
        resolved.tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(tmp), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    reloaded = transformers().AutoModelForCausalLM.from_pretrained(target, dtype=lm.dtype).to(device).eval()
    after = perplexity(reloaded, ids, mask)
    return PruneResult(out=target, dropped=dropped, blocks_before=len(blocks), container=blocks.container,
                       perplexity_before=before, perplexity_after=after, data=evalset.description)
