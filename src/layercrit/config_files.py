"""YAML and JSON read as a user means them: a key given twice in one mapping is an error (plain YAML and JSON keep
the last one silently). Sweep configs, metadata files (``--meta``) and group files (``--groups FILE``) read here."""

from __future__ import annotations

import json
from typing import Any


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing a repeated key (``yaml.constructor.ConstructorError`` naming it and its line)."""
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader


def load_json(text: str) -> Any:
    """``json.loads``, refusing a repeated key (``ValueError`` naming it)."""
    def unique(pairs: list[tuple[str, Any]]) -> dict:
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} is given twice")
            seen[key] = value
        return seen

    return json.loads(text, object_pairs_hook=unique)


def error_text(error: Exception) -> str:
    """A parser's error on one line, its place as "at line N, column M" (YAML names no file for text it parsed)."""
    return " ".join(str(error).split()).replace('in "<unicode string>", ', "at ")


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """YAML's safe loader, refusing a key given twice in one mapping."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" may be overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str | int | float | bool) and key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key if isinstance(key, str | int | float | bool) else id(key_node))
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader
