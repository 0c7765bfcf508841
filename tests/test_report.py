"""Specification of the HTML report: one self-contained page that shows every figure and table in a browser."""

import base64
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from layercrit.analysis import plots, report
from layercrit.analysis import tables as analysis

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync", "--virtual-time-budget=10000"]
# Marks the page title with how many images decoded; the report itself carries no scripts.
IMAGE_PROBE = ("<script>window.addEventListener('load', () => { const images = [...document.images]; "
               "document.title = 'images ' + images.filter(i => i.complete && i.naturalWidth > 0).length + '/' + "
               "images.length; });</script>")


def _figure_pngs(tmp_path, n):
    pngs = []
    for i in range(n):
        matrix = pd.DataFrame(np.arange(6.0).reshape(2, 3) * (i + 1), index=["a", "b"], columns=["x", "y", "z"])
        pngs.append(plots.save(plots.heatmap(matrix), tmp_path / f"figure{i}", dpi=50)[0])
    return pngs


def test_report_embeds_every_figure_and_table_and_fetches_nothing(tmp_path):
    pngs = _figure_pngs(tmp_path, 2)
    long = pd.DataFrame({"layer": [f"model.layer{i}" for i in range(report.COLLAPSE_ROWS + 1)], "value": 1.5})
    short = pd.DataFrame({"model_id": ["<b>tv</b>"], "avg_criticality_pct": [12.3456789]})
    path = report.write_report(tmp_path / "out" / "report.html", title="Layer criticality", summary=["3 models"],
                               figures=[("first figure", pngs[0]), ("second figure", pngs[1])],
                               tables=[("Models", short), ("Layers", long)])
    page = path.read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert [base64.b64decode(s.removeprefix("data:image/png;base64,")) for s in sources] == [
        p.read_bytes() for p in pngs]
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<script" not in page and "<link" not in page
    assert page.count("<table") == 2
    assert "&lt;b&gt;tv&lt;/b&gt;" in page and "<b>tv</b>" not in page  # model names are text, not markup
    assert "12.35" in page
    assert page.count("<details>") == 1 and f"{report.COLLAPSE_ROWS + 1} rows" in page
    assert "<figcaption>second figure</figcaption>" in page


@pytest.fixture(scope="module")
def analyzed_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([
        {"model_id": m, "layer": layer, "trial": t, "pred_cos_sim": rng.uniform()}
        for m in ("tv", "adv1", "adv2", "aug") for layer in ("model.conv1", "model.layer1.0.conv1", "model.fc")
        for t in range(2)
    ])
    meta = {"tv": {"category": "baseline", "accuracy": 76.0},
            "adv1": {"category": "adversarial_training", "accuracy": 70.0, "budget": "l2 1"},
            "adv2": {"category": "adversarial_training", "accuracy": 66.0, "budget": "l2 3"},
            "aug": {"category": "augmentation", "accuracy": 77.0}}
    return analysis.analyze(rows, out, meta=meta, pdf=False)


def test_report_holds_every_written_figure(analyzed_report):
    page = analyzed_report["paths"]["report"].read_text(encoding="utf-8")
    figures = [name for name, path in analyzed_report["paths"].items() if isinstance(path, tuple)]
    assert len(figures) == 7  # three heatmaps at page width, one at column width, scatter, budgets, depth
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    embedded = {base64.b64decode(s) for s in sources}
    assert embedded == {analyzed_report["paths"][name][0].read_bytes() for name in figures}


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser check needs /usr/bin/chromium "
                                                   "(apt-get install chromium)")
def test_report_opens_in_headless_chromium_with_every_image_loaded(analyzed_report, tmp_path):
    source = analyzed_report["paths"]["report"]
    probed = tmp_path / "report.html"
    probed.write_text(source.read_text(encoding="utf-8").replace("</body>", IMAGE_PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(probed, tmp_path / "profile-dom", "--dump-dom").stdout
    n_images = source.read_text(encoding="utf-8").count("<img ")
    assert n_images == 7
    assert f"<title>images {n_images}/{n_images}</title>" in dom

    shot = tmp_path / "screenshot.png"
    _chromium(source, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2400")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 10  # text and figures, not a blank page


def test_the_report_opens_with_the_run_conditions_read_from_the_rows(tmp_path):
    from layercrit.analysis.tables import analyze, run_conditions

    rows = pd.DataFrame({
        "model_id": ["a"] * 5, "layer": ["original", "conv1", "conv1", "fc", "fc"], "trial": [0, 0, 1, 0, 1],
        "reset": "rerandomize", "pred_cos_sim": [1.0, 0.5, 0.6, 0.9, 0.8], "top1_acc": 80.0,
        "n_images": 1000, "seed": 0, "data_id": "fashion-mnist-test-n1000-s0", "engine": "fast",
        "precision": "fp32", "layercrit_version": "9.9.9"})
    conditions = run_conditions(rows)
    assert conditions.to_dict(orient="records") == [{
        "reset": "rerandomize", "data_id": "fashion-mnist-test-n1000-s0", "seed": 0, "engine": "fast",
        "precision": "fp32", "layercrit_version": "9.9.9", "models": 1, "layers": 2, "trials per layer": "2",
        "images per evaluation": "1000"}]
    page = analyze(rows, tmp_path, pdf=False)["paths"]["report"].read_text()
    assert page.index("Run conditions") < page.index("Figures") and "9.9.9" in page
    assert page.index("fashion-mnist-test-n1000-s0") < page.index("Figures")
