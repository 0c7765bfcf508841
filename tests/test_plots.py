"""Specification of the figures: what each one shows, read back from its axes (not only that a file exists)."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection, QuadMesh
from matplotlib.colors import to_rgba
from PIL import Image

from layercrit import plots

LAYERS = ["[0.0] conv1:7x7", "[1.0] conv1:1x1", "[1.0] conv2:3x3", "[Head] fc"]
MODELS = ["Baseline [76.15%]", "PGD ε=1 [70.00%]", "PGD ε=3 [62.80%]"]


@pytest.fixture
def matrix():
    values = np.array([[10.0, 20.0, 30.0, 40.0], [50.0, np.nan, 70.0, 80.0], [5.0, 15.0, 25.0, 35.0]])
    return pd.DataFrame(values, index=MODELS, columns=LAYERS)


def axis(fig, label):
    return next(ax for ax in fig.axes if ax.get_label() == label)


def child(ax, label):
    return next(c for c in ax.child_axes if c.get_label() == label)


def texts(labels):
    return [t.get_text() for t in labels]


def test_heatmap_has_one_cell_per_model_and_layer_with_missing_cells_masked(matrix):
    fig = plots.heatmap(matrix, categories=["baseline", "adversarial_training", "adversarial_training"])
    ax = axis(fig, "heatmap")
    mesh = next(c for c in ax.collections if isinstance(c, QuadMesh))
    cells = mesh.get_array()
    assert cells.shape == (3, 4)
    assert cells.mask[1, 1] and cells.mask.sum() == 1
    np.testing.assert_allclose(cells.filled(np.nan), matrix.to_numpy())
    assert mesh.get_clim() == (0.0, 100.0)


def test_heatmap_labels_layers_on_top_in_order_and_models_beside_their_category_band(matrix):
    fig = plots.heatmap(matrix, categories=["baseline", "adversarial_training", "adversarial_training"])
    fig.canvas.draw()
    ax, bands = axis(fig, "heatmap"), axis(fig, "categories")
    assert texts(ax.get_xticklabels()) == LAYERS
    assert ax.xaxis.get_tick_params()["labeltop"] and not ax.xaxis.get_tick_params()["labelbottom"]
    assert texts(bands.get_yticklabels()) == MODELS
    assert ax.get_ylim() == (3.0, 0.0)  # first row on top
    rectangles = bands.patches
    assert [(r.get_y(), r.get_height()) for r in rectangles] == [(0, 1), (1, 2)]
    colors = plots.category_colors(["baseline", "adversarial_training"])
    assert [r.get_facecolor()[:3] for r in rectangles] == [to_rgba(colors[c])[:3]
                                                          for c in ("baseline", "adversarial_training")]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["baseline", "adversarial training"]


def test_heatmap_margins_show_mean_and_std_per_model_and_per_layer(matrix):
    fig = plots.heatmap(matrix)
    ax = axis(fig, "heatmap")
    right, bottom = child(ax, "row margin"), child(ax, "column margin")
    values = matrix.to_numpy()
    expected_rows = [f"{m:.0f}±{s:.0f}" for m, s in zip(np.nanmean(values, 1), np.nanstd(values, 1), strict=True)]
    expected_cols = [f"{m:.0f}±{s:.0f}" for m, s in zip(np.nanmean(values, 0), np.nanstd(values, 0), strict=True)]
    assert texts(right.get_yticklabels()) == expected_rows
    assert texts(bottom.get_xticklabels()) == expected_cols
    assert not any(ax.get_label() == "categories" for ax in fig.axes)
    assert texts(ax.get_yticklabels()) == MODELS


def test_delta_heatmap_uses_a_symmetric_diverging_scale(matrix):
    fig = plots.heatmap(matrix - matrix.iloc[0].to_numpy(), cmap="coolwarm", vmin=-100.0, vmax=100.0)
    mesh = next(c for c in axis(fig, "heatmap").collections if isinstance(c, QuadMesh))
    assert mesh.get_clim() == (-100.0, 100.0)
    assert mesh.get_cmap().name == "coolwarm"
    np.testing.assert_allclose(mesh.get_array()[0], 0.0)


def test_heatmap_scale_without_limits_spans_the_data(matrix):
    mesh = next(c for c in axis(plots.heatmap(matrix, vmax=None), "heatmap").collections if isinstance(c, QuadMesh))
    assert mesh.get_clim() == (0.0, np.nanmax(matrix.to_numpy()))


def _models():
    return pd.DataFrame({
        "model_id": ["tv", "adv1", "adv2", "adv3", "aug"],
        "category": ["baseline", "adversarial_training", "adversarial_training", "adversarial_training", "augment"],
        "avg_criticality": [40.0, 45.0, 50.0, 55.0, 38.0],
        "accuracy": [76.0, 70.0, 65.0, 60.0, np.nan],
        "budget": [np.nan, 3.0, 1.0, 4 / 255, np.nan],
        "norm": [None, "L2", "L2", "Linf", None],
    })


def test_accuracy_scatter_has_one_series_per_category_and_the_correlation_in_the_legend():
    correlation = {"n": 4, "spearman_rho": -1.0, "spearman_p": 0.0, "kendall_tau": -0.667, "kendall_p": 0.33}
    fig = plots.accuracy_scatter(_models(), correlation=correlation)
    ax = axis(fig, "scatter")
    series = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert [s.get_label() for s in series] == ["baseline", "adversarial training"]  # "augment" has no accuracy
    np.testing.assert_allclose(series[1].get_offsets(), [[45.0, 70.0], [50.0, 65.0], [55.0, 60.0]])
    title = fig.legends[0].get_title().get_text()
    assert "Spearman ρ = -1.00" in title and "Kendall τ = -0.67 (p = 0.33)" in title and "n = 4" in title


def test_budget_plot_has_one_line_per_norm_sorted_by_budget():
    fig = plots.budget_plot(_models())
    lines = axis(fig, "budget").get_lines()
    assert [line.get_label() for line in lines] == ["L2", "Linf"]
    np.testing.assert_allclose(lines[0].get_xdata(), [1.0, 3.0])
    np.testing.assert_allclose(lines[0].get_ydata(), [50.0, 45.0])


def test_depth_profile_has_one_line_and_band_per_category():
    profile = pd.DataFrame({
        "category": ["baseline"] * 3 + ["adversarial_training"] * 3,
        "relative_depth": [0.0, 0.5, 1.0] * 2,
        "criticality_mean": [10.0, 50.0, 30.0, 20.0, 40.0, 60.0],
        "criticality_std": [0.0] * 3 + [5.0] * 3,
        "models": [1] * 3 + [3] * 3,
    })
    ax = axis(plots.profile_plot(profile), "profile")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["baseline (1)", "adversarial training (3)"]
    np.testing.assert_allclose(lines[1].get_ydata(), [20.0, 40.0, 60.0])
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2
    assert ax.get_xlim() == (0.0, 1.0)


def test_category_colors_are_distinct_with_baseline_black_and_other_grey():
    colors = plots.category_colors(["baseline", "a", "b", "other", "a"])
    assert list(colors) == ["baseline", "a", "b", "other"]
    assert to_rgba(colors["baseline"]) == to_rgba("black")
    assert to_rgba(colors["other"]) == to_rgba("0.6")
    assert len({to_rgba(c) for c in colors.values()}) == 4
    assert plots.category_colors(["baseline", "a", "b", "other"]) == colors


def test_save_writes_a_png_of_the_figure_size_and_a_pdf(matrix, tmp_path):
    fig = plots.heatmap(matrix)
    png, pdf = plots.save(fig, tmp_path / "figures" / "heatmap", dpi=100)
    assert (png, pdf) == (tmp_path / "figures" / "heatmap.png", tmp_path / "figures" / "heatmap.pdf")
    width, height = fig.get_size_inches() * 100
    assert Image.open(png).size == (round(width), round(height))
    assert pdf.read_bytes().startswith(b"%PDF")


def test_heatmap_marks_uncertain_cells_with_a_dot_at_their_centre(matrix):
    uncertain = pd.DataFrame([[True, False, False, False], [False, False, False, True], [False] * 4])
    ax = axis(plots.heatmap(matrix, uncertain=uncertain), "heatmap")
    dots = next(c for c in ax.collections if c.get_label() == "uncertain")
    np.testing.assert_allclose(dots.get_offsets(), [[0.5, 0.5], [3.5, 1.5]])
    assert not any(c.get_label() == "uncertain" for c in axis(plots.heatmap(matrix), "heatmap").collections)
