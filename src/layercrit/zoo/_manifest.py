"""A trained zoo's ``manifest.yaml``: one record per member, in the zoo's recipe order, written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

MANIFEST = "manifest.yaml"


def write_record(out: Path, record: dict, recipes: Sequence[dict], header: Mapping[str, object]) -> None:
    """Add or replace ``record`` in ``out/manifest.yaml`` (members sorted as ``recipes``, ``header`` first), by a
    rename, so a reader never sees half a file; readable by everyone, like the weights beside it."""
    path = out / MANIFEST
    models = yaml.safe_load(path.read_text())["models"] if path.is_file() else []
    models = [m for m in models if m["id"] != record["id"]] + [record]
    order = {recipe["id"]: i for i, recipe in enumerate(recipes)}
    models.sort(key=lambda m: order.get(m["id"], len(order)))
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump({**header, "models": models}, f, sort_keys=False, allow_unicode=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
