"""Training small causal language models (the language-model zoo): one loop, :func:`fit_causal_lm`.

The loop is seeded AdamW over fixed token windows (linear warm-up, then cosine decay to 10%), optionally distilling
from a teacher's next-token distributions, in bf16 mixed precision on CPUs with AMX as :func:`layercrit.training.fit`.
Inside :func:`layercrit.training.resumable` it keeps its state every ``checkpoint_every`` steps and goes on from
there when started again, with the numbers an uninterrupted run gives.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LayercritError
from .training import PRECISIONS, _next_checkpoint


def fit_causal_lm(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 50,
    weight_decay: float = 0.0,
    precision: str = "bf16",
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    temperature: float = 1.0,
    checkpoint_every: int = 25,
    seed: int = 0,
) -> list[float]:
    """Train a Hugging Face causal LM (``model(input_ids).logits``) on ``windows`` (N × T token ids) for ``steps``.

    Args:
        windows: training windows; each step draws ``batch_size`` of them at random (seeded by ``seed``).
        lr, warmup, weight_decay: AdamW (betas 0.9, 0.95) with ``warmup`` steps of linear warm-up, then cosine to
            ``lr / 10``; weight decay on matrices only (not on biases, norms or embeddings' positions).
        precision: ``fp32`` or ``bf16`` (autocast; weights and optimizer state stay float32).
        teacher: a causal LM with the same vocabulary; the loss is then ``(1 - distill_weight) · NLL +
            distill_weight · T² · KL(teacher ‖ student)`` at temperature ``temperature``.
        checkpoint_every: steps between saved states (within :func:`~layercrit.training.resumable`).

    Returns:
        The mean training loss of every block of ``checkpoint_every`` steps.
    """
    if precision not in PRECISIONS:
        raise LayercritError(f"unknown training precision {precision!r}: one of {', '.join(PRECISIONS)}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wpe" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    step, losses, running = 0, [], []
    checkpoint, clock = _next_checkpoint() or (None, None)
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        g.set_state(saved["generator"])
        step, losses = saved["step"], saved["losses"]
    device = next(model.parameters()).device
    model.train()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, warmup)
        batch = windows[torch.randint(len(windows), (batch_size,), generator=g)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(batch[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(batch[:, :-1]).logits.float()
                kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(target / temperature, -1),
                              log_target=True, reduction="none").sum(-1).mean()
                loss = (1 - distill_weight) * loss + distill_weight * temperature ** 2 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        step += 1
        if step % checkpoint_every == 0 or step == steps:
            losses.append(sum(running) / len(running))
            running = []
            if checkpoint is not None:
                _save(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "generator": g.get_state(), "step": step, "losses": losses})
                clock.save()
    model.eval()
    return losses


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, mask: torch.Tensor | None = None, *,
               batch_size: int = 32) -> float:
    """exp(mean next-token NLL) of a causal LM over the predicted positions of ``windows`` (N × T token ids):
    every position but the first, or with ``mask`` (N × T, 1 = a real token) those whose token and next token
    are both real."""
    device = next(model.parameters()).device
    mask = torch.ones_like(windows) if mask is None else mask
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids, m = windows[start:start + batch_size].to(device), mask[start:start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=m).logits[:, :-1].float()
        counted = (m[:, :-1] * m[:, 1:]).bool()
        total += F.cross_entropy(logits[counted], ids[:, 1:][counted], reduction="sum").item()
        count += int(counted.sum())
    return math.exp(total / count)
