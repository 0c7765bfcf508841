"""One self-contained HTML page with every figure and table: images are embedded, nothing is fetched, no scripts."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

COLLAPSE_ROWS = 60  # longer tables are folded (<details>) so the page stays scannable

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.75rem; overflow-x: auto; font-size: 0.85rem; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9rem; color: #555; margin-top: 0.3rem; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0; }
th, td { padding: 0.2rem 0.5rem; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; }
.scroll { overflow-x: auto; }
"""


def write_report(
    path: str | Path,
    *,
    title: str,
    summary: Sequence[str],
    figures: Sequence[tuple[str, Path]],
    tables: Sequence[tuple[str, pd.DataFrame]],
    conditions: pd.DataFrame | None = None,
) -> Path:
    """Write the HTML report and return its path.

    Args:
        path: the ``.html`` file to write.
        title: page heading.
        summary: lines shown preformatted at the top (sizes, metric, correlations).
        figures: (caption, PNG path) pairs; each PNG is embedded as a data URI.
        tables: (heading, DataFrame) pairs, shown in full; tables longer than 60 rows start folded.
        conditions: how the results were made (images, trials, reset, data, version...), shown first.
    """
    path = Path(path)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if conditions is not None:
        parts += ["<h2>Run conditions</h2>", f'<div class="scroll">{_table_html(conditions)}</div>']
    parts += [f"<pre>{html.escape(chr(10).join(summary))}</pre>", "<h2>Figures</h2>"]
    for caption, png in figures:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption, quote=True)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for heading, table in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        body = f'<div class="scroll">{_table_html(table)}</div>'
        if len(table) > COLLAPSE_ROWS:
            body = f"<details><summary>{len(table)} rows</summary>{body}</details>"
        parts.append(body)
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _table_html(table: pd.DataFrame) -> str:
    return table.to_html(index=False, border=0, na_rep="–", float_format=lambda v: f"{v:.4g}", escape=True)
