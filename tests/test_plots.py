"""Specification of the figures: what each one shows, read back from its axes (not only that a file exists)."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection, QuadMesh
from matplotlib.colors import to_rgba
from PIL import Image

from layercrit.analysis import plots

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
        "avg_criticality_pct": [40.0, 45.0, 50.0, 55.0, 38.0],
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


def test_every_scatter_point_is_named_without_what_its_category_shares_and_no_names_overlap():
    models = _models().assign(display=["Baseline", "PGD Adversarial Training (L2, ε=3)",
                                       "PGD Adversarial Training (L2, ε=1)", "PGD Adversarial Training (Linf, ε=4)",
                                       "Augment"],
                              avg_criticality_pct=[40.0, 45.0, 45.5, 46.0, 38.0], accuracy=[76.0, 70.0, 70.2, 70.4, 0])
    fig = plots.accuracy_scatter(models)
    fig.canvas.draw()
    ax = axis(fig, "scatter")
    names = [t for t in ax.texts if t.get_label() == "point label"]
    assert [t.get_text() for t in names] == ["Baseline", "L2, ε=3", "L2, ε=1", "Linf, ε=4", "Augment"]
    assert all(t.get_fontsize() >= plots.MIN_FONT for t in names)
    assert [t.get_color() for t in names][:2] == ["black", plots.CATEGORY_COLORS["adversarial_training"]]
    boxes = [t.get_window_extent() for t in names]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


@pytest.mark.parametrize(("displays", "categories", "short"), [
    (["PGD Adversarial Training (L2, ε=3) [62.83%]", "PGD Adversarial Training (ε=0) [75.81%]"], ["adv", "adv"],
     ["L2, ε=3 [62.83%]", "ε=0 [75.81%]"]),
    (["timm A1", "timm A2", "TorchVision 2"], ["recipe"] * 3, ["timm A1", "timm A2", "TorchVision 2"]),
    (["MoCo v3 (100Ep)", "MoCo v3 (300Ep)", "SwAV"], ["ssl", "ssl", "other"], ["100Ep", "300Ep", "SwAV"]),
    (["Baseline (SGD) (seed 0) [92.63%]", "Baseline (SGD) (seed 1) [92.40%]"], ["baseline"] * 2,
     ["Baseline (SGD) (seed 0) [92.63%]", "Baseline (SGD) (seed 1) [92.40%]"]),  # seeds of one model keep its name
    (["PGD L∞ ε=8/255 (seed 0)", "PGD L∞ ε=8/255 (seed 1)", "PGD L2 ε=0.5"], ["adv"] * 3,
     ["L∞ ε=8/255 (seed 0)", "L∞ ε=8/255 (seed 1)", "L2 ε=0.5"]),
    (["Aug (crop light) [90.0%]", "Aug (crop heavy) [91.0%]"], ["aug"] * 2,
     ["crop light [90.0%]", "crop heavy [91.0%]"]),  # a shared prefix never cuts into a parenthesis
])
def test_short_labels_drop_the_words_a_category_shares(displays, categories, short):
    assert plots.short_labels(displays, categories) == short


def test_a_label_cut_to_fit_keeps_its_training_seed_and_accuracy():
    text = "Improved (cosine, label smoothing, mixup, longer) (seed 1) [93.42%]"
    limit = plots._text_width(["Improved (cosine (seed 1) [93.42%]"], plots.SMALL)
    cut = plots._shorten([text, "Short [1.00%]"], limit, plots.SMALL)
    assert cut[0].startswith("Improved (co") and cut[0].endswith("… (seed 1) [93.42%]"), cut[0]
    assert plots._text_width([cut[0]], plots.SMALL) <= limit and cut[1] == "Short [1.00%]"


def test_budget_plot_gives_each_norm_its_own_panel_and_axis():
    models = pd.concat([_models(), pd.DataFrame({
        "model_id": ["adv0", "adv4"], "category": ["adversarial_training"] * 2, "avg_criticality_pct": [42.0, 60.0],
        "accuracy": [75.0, 55.0], "budget": [0.0, 8 / 255], "norm": ["L2", "Linf"]})], ignore_index=True)
    fig = plots.budget_plot(models)
    l2, linf = axis(fig, "budget L2"), axis(fig, "budget Linf")
    # ε = 0 is the origin of both norms; L∞ is read in units of 1/255
    np.testing.assert_allclose(l2.get_lines()[0].get_xdata(), [0.0, 1.0, 3.0])
    np.testing.assert_allclose(l2.get_lines()[0].get_ydata(), [42.0, 50.0, 45.0])
    np.testing.assert_allclose(linf.get_lines()[0].get_xdata(), [0.0, 4.0, 8.0])
    np.testing.assert_allclose(linf.get_lines()[0].get_ydata(), [42.0, 55.0, 60.0])
    assert linf.get_xlabel() == "ε (L∞, in 1/255)" and l2.get_xlabel() == "ε (L2)"
    points = next(c for c in linf.collections if isinstance(c, PathCollection))
    assert {tuple(c) for c in points.get_facecolors()} == {to_rgba(plots.CATEGORY_COLORS["adversarial_training"])}


def test_budgets_spanning_decades_get_a_symmetric_log_axis_so_small_ones_stay_apart():
    budgets = [0.0, 0.01, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 5.0]
    models = pd.DataFrame({"model_id": [f"m{b}" for b in budgets], "category": "adversarial_training",
                           "avg_criticality_pct": np.linspace(40, 60, len(budgets)), "accuracy": 70.0,
                           "budget": budgets, "norm": "L2"})
    fig = plots.budget_plot(models)
    fig.canvas.draw()
    ax = axis(fig, "budget L2")
    assert ax.get_xscale() == "symlog"
    x = ax.transData.transform(np.column_stack([budgets, np.full(len(budgets), 50.0)]))[:, 0]
    assert np.diff(x).min() > 6  # display points between neighbouring budgets (a linear axis gives under 1)


def test_depth_profile_has_one_line_and_band_per_category():
    profile = pd.DataFrame({
        "category": ["baseline"] * 3 + ["adversarial_training"] * 3,
        "relative_depth": [0.0, 0.5, 1.0] * 2,
        "criticality_pct": [10.0, 50.0, 30.0, 20.0, 40.0, 60.0],
        "criticality_std_pct": [0.0] * 3 + [5.0] * 3,
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


def test_each_category_keeps_its_colour_whatever_the_order_or_company():
    paper = ["baseline", "adversarial_training", "augmentation", "contrastive", "training_recipes", "freezing"]
    one, other = plots.category_colors(paper + ["mine"]), plots.category_colors(["mine", *reversed(paper)])
    assert all(to_rgba(one[c]) == to_rgba(other[c]) for c in one)
    assert to_rgba(plots.category_colors(["contrastive"])["contrastive"]) == to_rgba(one["contrastive"])
    assert len({to_rgba(c) for c in one.values()}) == len(one)  # a new category takes a colour nobody has


def test_save_writes_a_png_of_the_figure_size_and_a_pdf(matrix, tmp_path):
    fig = plots.heatmap(matrix)
    png, pdf = plots.save(fig, tmp_path / "figures" / "heatmap", dpi=100)
    assert (png, pdf) == (tmp_path / "figures" / "heatmap.png", tmp_path / "figures" / "heatmap.pdf")
    width, height = fig.get_size_inches() * 100
    assert np.allclose(Image.open(png).size, (width, height), atol=1)  # whole pixels
    assert pdf.read_bytes().startswith(b"%PDF")


def test_heatmap_marks_uncertain_cells_with_a_dot_at_their_centre(matrix):
    uncertain = pd.DataFrame([[True, False, False, False], [False, False, False, True], [False] * 4])
    ax = axis(plots.heatmap(matrix, uncertain=uncertain), "heatmap")
    dots = next(c for c in ax.collections if c.get_label() == "uncertain")
    np.testing.assert_allclose(dots.get_offsets(), [[0.5, 0.5], [3.5, 1.5]])
    assert not any(c.get_label() == "uncertain" for c in axis(plots.heatmap(matrix), "heatmap").collections)


# ---------------------------------------------------------------- legible at paper size


def _paper_matrix() -> tuple[pd.DataFrame, list[str]]:
    """The paper's heatmap: 50 models (their names and accuracies from the registry) × its 54 layers."""
    from layercrit.analysis.tables import display_layer
    from layercrit.zoo import paper

    entries = sorted((e for e in paper.entries() if e["accuracy"] is not None), key=lambda e: e["category"])
    layers = ["model.conv1"]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            layers += [f"model.layer{stage}.{block}.conv{i}" for i in (1, 2, 3)]
            layers += [f"model.layer{stage}.{block}.downsample.0"] if block == 0 else []
    layers.append("model.fc")
    values = np.random.default_rng(0).uniform(0, 100, (len(entries), len(layers)))
    rows = [f"{e['display']} [{e['accuracy']:.2f}%]" for e in entries]
    return pd.DataFrame(values, index=rows, columns=[display_layer(name) for name in layers]), [
        e["category"] for e in entries]


@pytest.fixture(scope="module")
def paper_size():
    matrix, categories = _paper_matrix()
    figures = {width: plots.heatmap(matrix, categories=categories, width=width)
               for width in (plots.FULL_WIDTH, plots.COLUMN_WIDTH)}
    for fig in figures.values():
        fig.canvas.draw()
    return matrix, figures


@pytest.mark.parametrize("width", [plots.FULL_WIDTH, plots.COLUMN_WIDTH])
def test_paper_size_heatmap_has_its_width_and_no_text_under_6_points(paper_size, width):
    _, figures = paper_size
    fig = figures[width]
    assert fig.get_figwidth() == width
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
             if t.get_visible() and t.get_text()]
    assert texts and min(t.get_fontsize() for t in texts) >= 6.0
    frame = fig.bbox
    assert all(frame.contains(*t.get_window_extent().p0) and frame.contains(*t.get_window_extent().p1)
               for t in texts)


@pytest.mark.parametrize("width", [plots.FULL_WIDTH, plots.COLUMN_WIDTH])
def test_paper_size_heatmap_labels_every_kth_layer_and_every_model_without_overlap(paper_size, width):
    matrix, figures = paper_size
    fig = figures[width]
    ax, bands = axis(fig, "heatmap"), axis(fig, "categories")
    columns = [t for t in ax.get_xticklabels() if t.get_text()]
    step = round(ax.get_xticks()[1] - ax.get_xticks()[0])
    assert [t.get_text() for t in columns] == list(matrix.columns[::step])
    assert len(columns) >= (6 if width == plots.COLUMN_WIDTH else 18)
    rows = [t for t in bands.get_yticklabels() if t.get_text()]
    assert len(rows) == len(matrix)
    for labels in (columns, rows):
        boxes = [t.get_window_extent() for t in labels]
        assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:], strict=False))
    margins = child(ax, "column margin").get_xticklabels()
    assert len([t for t in margins if t.get_text()]) == len(columns)  # a margin under each named layer


def test_full_width_heatmap_keeps_the_papers_model_names_whole(paper_size):
    matrix, figures = paper_size
    names = [t.get_text() for t in axis(figures[plots.FULL_WIDTH], "categories").get_yticklabels()]
    assert names == list(matrix.index)
    short = [t.get_text() for t in axis(figures[plots.COLUMN_WIDTH], "categories").get_yticklabels()]
    assert "L2, ε=0.01 [75.67%]" in short  # the adversarial models lose only what they share


def test_the_variance_figure_puts_a_zero_component_on_its_floor_not_below_the_axis():
    rows = []
    for level, units in (("stage", ["layer1"]), ("layer", ["layer1.0.conv1", "layer1.0.conv2"])):
        for unit in units:
            for component, sd in (("method", 0.0 if unit.endswith("conv2") else 4.0), ("seed", 2.0), ("reset", 3.0),
                                  ("image", 30.0)):
                rows.append({"level": level, "unit": unit, "component": component, "sd_pct": sd,
                             "sd_low_pct": 0.0 if component == "method" else sd / 2, "sd_high_pct": sd * 2})
    fig = plots.variance_plot(pd.DataFrame(rows))
    layers_ax = fig.axes[1]
    assert layers_ax.get_ylim()[0] == pytest.approx(0.5)  # half the smallest positive value, 1.0
    method_line = layers_ax.lines[0]
    assert list(method_line.get_ydata()) == [4.0, 0.5], "the zero estimate is drawn on the floor"
    triangles = [line for line in layers_ax.lines if line.get_marker() == "v"]
    assert [list(t.get_xdata()) for t in triangles] == [[1]]
    assert not [line for line in fig.axes[0].lines if line.get_marker() == "v"], "no stage bar is 0 here"
    stage_rows = pd.DataFrame(rows).assign(sd_pct=lambda f: f.sd_pct.where(~((f.level == "stage")
                                                                            & (f.component == "seed")), 0.0))
    stage_triangles = [line for line in plots.variance_plot(stage_rows).axes[0].lines if line.get_marker() == "v"]
    assert [list(t.get_ydata()) for t in stage_triangles] == [[0.5]], "a zero bar is marked on the floor"


def test_the_variance_figure_shows_the_mean_and_the_depth_shift_after_the_stages():
    rows = [{"level": level, "unit": unit, "component": component, "sd_pct": 2.0, "sd_low_pct": 1.0,
             "sd_high_pct": 4.0}
            for level, units in (("layer", ["conv1", "layer1.0.conv1", "layer2.0.conv1"]),
                                 ("stage", ["conv1", "layer1", "layer2"]),
                                 ("aggregate", ["all layers", "depth shift"]))
            for unit in units for component in ("method", "seed", "reset", "image")]
    stages_ax, layers_ax = plots.variance_plot(pd.DataFrame(rows)).axes[:2]
    assert [t.get_text() for t in stages_ax.get_xticklabels()] == ["conv1", "layer1", "layer2", "all layers",
                                                                   "depth shift"]
    assert len(stages_ax.patches) == 5 * 4, "a bar per unit and component"
    separators = [line for line in stages_ax.lines if line.get_linestyle() == "--"]
    assert [list(line.get_xdata()) for line in separators] == [[2.5, 2.5]]
    assert len(layers_ax.get_xticklabels()) == 3
