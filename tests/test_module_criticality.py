"""Module criticality (Chatterji et al.): the grid search, its bound, its sum, and the command line."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import layercrit
from layercrit.cli import main
from layercrit.data import load_data, load_fashion_mnist, subset_indices
from layercrit.errors import LayercritError
from layercrit.measurement.layers import select_layers
from layercrit.measurement.module_criticality import module_criticality
from layercrit.measurement.resets import Interpolate, Noise, Reinit
from layercrit.models import Preprocessing, wrap_module

from .conftest import TinyCNN

ALPHAS = [0.0, 0.5, 1.0]
SIGMAS = [0.3, 0.1, 0.03, 0.01]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TinyCNN trained for a few steps from the initial weights saved in init.pth (its `unused` conv never
    moves: no gradient reaches it), the images it was trained on, and the checkpoint path."""
    torch.manual_seed(0)
    net = TinyCNN()
    path = tmp_path_factory.mktemp("init") / "init.pth"
    torch.save(net.state_dict(), path)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    resolved = wrap_module(net, preprocessing=Preprocessing(resize=None, crop=None, mean=(0.5,), std=(0.25,),
                                                            in_chans=1, source="test"), spec="test:trained")
    optimizer = torch.optim.Adam(resolved.model.parameters(), lr=1e-2)
    resolved.model.train()
    for _ in range(60):
        loss = F.cross_entropy(resolved.model(images.float() / 255), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    resolved.model.eval()
    return resolved, (images, labels), path


def criticality(trained, **options):
    resolved, data, path = trained
    options = {"alphas": ALPHAS, "sigmas": SIGMAS, "draws": 2, "batch_size": 64, **options}
    return module_criticality(resolved, data, init=path, **options)


def rms(module) -> float:
    """The root mean square of a module's trained parameters: what a relative σ is multiplied by."""
    values = torch.cat([p.detach().flatten() for p in module.parameters()])
    return float(values.pow(2).mean().sqrt())


def test_criticality_is_the_grid_minimum_that_a_brute_force_search_finds(trained):
    """The defaults, by hand: noise of std σ × the layer's weight RMS, cross-entropy, ε = 1.01 × the trained loss."""
    resolved, data, path = trained
    table = criticality(trained).set_index("layer")
    layers = select_layers(resolved.model)
    initial = Reinit(checkpoint=path)
    expected = {}
    for layer in layers:
        scale = rms(resolved.model.get_submodule(layer))
        for alpha in ALPHAS:
            for sigma in SIGMAS:
                reset = Noise(sigma=sigma * scale, base=Interpolate(alpha=1 - alpha, base=initial))
                rows = layercrit.measure(resolved, data, layers=[layer], reset=reset, trials=2, batch_size=64)
                bound = 1.01 * rows.loss.iloc[0]
                value = rows.loss[rows.layer == layer].mean()
                if value <= bound:
                    mu = alpha**2 * table.loc[layer, "distance"] ** 2 / (sigma * scale) ** 2
                    expected.setdefault(layer, []).append((mu, alpha, -sigma))
    for layer in layers:
        mu, alpha, negative_sigma = min(expected[layer])
        assert table.loc[layer, "mu"] == pytest.approx(mu)
        assert (table.loc[layer, "alpha"], table.loc[layer, "sigma"]) == (alpha, -negative_sigma)
    assert table.loc["model.conv2", "mu"] > 0


def test_relative_noise_is_sigma_times_the_rms_of_the_modules_trained_weights(trained):
    resolved, _, _ = trained
    table = criticality(trained).set_index("layer")
    for layer in ("model.conv1", "model.conv2", "model.fc"):
        module = resolved.model.get_submodule(layer)
        norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in module.parameters()))
        assert table.loc[layer, "weight_norm"] == pytest.approx(norm, rel=1e-6)
        assert table.loc[layer, "noise_std"] == pytest.approx(table.loc[layer, "sigma"] * rms(module), rel=1e-6)
    assert (table.sigma_scale == "relative").all()


def test_absolute_noise_is_sigma_in_parameter_units_for_every_module(trained):
    table = criticality(trained, sigma_scale="absolute")
    modules = table[table.layer != "network"].dropna(subset=["sigma"])
    assert len(modules) and (modules.noise_std == modules.sigma).all()
    assert (table.sigma_scale == "absolute").all()


def test_alpha_runs_from_the_initial_weights_to_the_trained_ones(trained):
    """At σ → 0 the expected error at α is the error with the layer set to (1 − α)·θ⁰ + α·θ^F, by hand."""
    resolved, (images, labels), path = trained
    initial = torch.load(path)
    fc = resolved.model.model.fc
    table = module_criticality(resolved, (images, labels), init=path, layers="fc", alphas=[0.25], sigmas=[1e-9],
                               draws=1, criterion="error", epsilon=1.0, batch_size=64)
    trained_weight, trained_bias = fc.weight.detach().clone(), fc.bias.detach().clone()
    with torch.no_grad():
        fc.weight.copy_(0.75 * initial["fc.weight"] + 0.25 * trained_weight)
        fc.bias.copy_(0.75 * initial["fc.bias"] + 0.25 * trained_bias)
        by_hand = (resolved.model(images.float() / 255).argmax(1) != labels).float().mean().item()
        fc.weight.copy_(trained_weight)
        fc.bias.copy_(trained_bias)
    assert table.set_index("layer").loc["model.fc", "expected"] == pytest.approx(by_hand)


def test_module_that_never_left_its_initialisation_has_zero_criticality(trained):
    table = criticality(trained).set_index("layer")
    assert table.loc["model.unused", "distance"] == 0 and table.loc["model.unused", "mu"] == 0


def test_network_criticality_is_the_sum_over_modules(trained):
    table = criticality(trained)
    modules = table[table.layer != "network"]
    assert table.iloc[-1].layer == "network"
    assert table.iloc[-1].mu == pytest.approx(modules.mu.sum())


def test_distance_is_the_frobenius_norm_of_the_change_since_initialisation(trained):
    resolved, _, path = trained
    initial = torch.load(path)
    table = criticality(trained).set_index("layer")
    conv = resolved.model.model.conv2
    by_hand = math.sqrt(float((conv.weight.detach() - initial["conv2.weight"]).pow(2).sum()
                              + (conv.bias.detach() - initial["conv2.bias"]).pow(2).sum()))
    assert table.loc["model.conv2", "distance"] == pytest.approx(by_hand, rel=1e-6)


def trained_values(trained) -> tuple[float, float]:
    """The trained network's cross-entropy and top-1 error on the fixture's images."""
    resolved, (images, labels), _ = trained
    with torch.no_grad():
        logits = resolved.model(images.float() / 255)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) != labels).float().mean().item()


def test_default_epsilon_is_1_01_times_the_trained_loss(trained):
    loss, _ = trained_values(trained)
    table = criticality(trained)
    assert table.epsilon.nunique() == 1 and table.epsilon.iloc[0] == pytest.approx(1.01 * loss, rel=1e-5)
    assert (table.criterion == "loss").all() and (table.draws == 2).all()


def test_a_relative_tolerance_scales_the_trained_value(trained):
    loss, _ = trained_values(trained)
    assert criticality(trained, tolerance=0.2).epsilon.iloc[0] == pytest.approx(1.2 * loss, rel=1e-5)


def test_the_additive_rule_is_the_trained_error_plus_the_tolerance(trained):
    _, error = trained_values(trained)
    table = criticality(trained, criterion="error", epsilon_rule="additive")
    assert table.epsilon.iloc[0] == pytest.approx(error + 0.05)
    assert criticality(trained, criterion="error", epsilon_rule="additive", tolerance=0.1).epsilon.iloc[0] == \
        pytest.approx(error + 0.1)


def test_a_criterion_can_be_any_function_of_the_measured_rows(trained):
    def top5_error(rows):
        return (100.0 - rows.top5_acc) / 100.0

    table = criticality(trained, criterion=top5_error, epsilon_rule="additive", tolerance=0.0)
    resolved, (images, labels), _ = trained
    with torch.no_grad():
        top5 = resolved.model(images.float() / 255).topk(5, dim=1).indices
    error = 1 - (top5 == labels[:, None]).any(1).float().mean().item()
    assert table.epsilon.iloc[0] == pytest.approx(error) and (table.criterion == "top5_error").all()


def test_a_relative_bound_on_a_negative_criterion_is_an_error(trained):
    with pytest.raises(LayercritError, match=r"a relative epsilon needs a criterion >= 0.*--epsilon-rule additive"):
        criticality(trained, criterion=lambda rows: -rows.loss)


def test_a_looser_bound_never_makes_a_module_more_critical(trained):
    strict = criticality(trained, tolerance=0.0).set_index("layer").mu
    loose = criticality(trained, tolerance=0.5).set_index("layer").mu
    assert (loose <= strict).all() and (loose < strict).any()


def test_a_bound_no_grid_point_meets_gives_infinite_criticality(trained):
    table = criticality(trained, epsilon=-1.0)
    assert table.mu.map(math.isinf).all() and table.alpha.isna().all()


def test_every_grid_evaluation_is_handed_over_as_it_finishes(trained):
    seen = []
    table = criticality(trained, on_evaluations=seen.append)
    assert len(seen) > 1 and len(seen[-1]) == table.iloc[-1].evaluations
    assert list(seen[-1].columns) == ["layer", "alpha", "sigma", "noise_std", "expected", "original"]


@pytest.mark.parametrize(("options", "message"), [
    ({"criterion": "accuracy"}, r"unknown criterion 'accuracy': one of error, loss"),
    ({"alphas": [0.5, 1.5]}, r"module criticality needs alphas in \[0, 1\]"),
    ({"sigmas": [0.1, 0.0]}, r"module criticality needs sigmas > 0"),
    ({"draws": 0}, r"at least one noise draw \(--draws\)"),
    ({"sigma_scale": "percent"}, r"unknown sigma scale 'percent': one of relative, absolute"),
    ({"epsilon_rule": "x1.01"}, r"unknown epsilon rule 'x1.01': one of relative, additive"),
])
def test_bad_options_are_one_line_errors(trained, options, message):
    with pytest.raises(LayercritError, match=message):
        criticality(trained, **options)


def test_a_missing_initial_checkpoint_is_an_error(trained, tmp_path):
    resolved, data, _ = trained
    with pytest.raises(LayercritError, match=r"checkpoint not found: .*nowhere\.pth"):
        module_criticality(resolved, data, init=tmp_path / "nowhere.pth")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A ResNet-8's initial weights and, 'trained', the same weights moved by a little noise."""
    folder = tmp_path_factory.mktemp("resnet8")
    torch.manual_seed(0)
    net = layercrit.resolve_model("layercrit:fmnist_resnet8", pretrained=False).model.model
    torch.save(net.state_dict(), folder / "init.pth")
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    torch.save(net.state_dict(), folder / "final.pth")
    return folder


def command(checkpoints, out, *options):
    return main(["module-criticality", "--model", str(checkpoints / "final.pth"), "--arch", "layercrit:fmnist_resnet8",
                 "--init", str(checkpoints / "init.pth"), "--data", "fashion-mnist-train", "--images", "16",
                 "--layers", "conv1,fc", "--alphas", "0,1", "--sigmas", "0.1,0.01", "--draws", "1",
                 "--out", str(out), *options])


def test_command_writes_the_table_and_the_evaluations_on_training_images(checkpoints, tmp_path, capsys):
    assert command(checkpoints, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "network" in out and "epsilon" in out and "noise_std" in out
    table = pd.read_csv(tmp_path / "out" / "module_criticality.csv")
    assert list(table.layer) == ["model.conv1", "model.fc", "network"]
    assert (table.data_id == "fashion-mnist-train-n16-s0").all()
    assert (table.sigma_scale == "relative").all() and (table.criterion == "loss").all()
    evaluations = pd.read_csv(tmp_path / "out" / "evaluations.csv")
    assert len(evaluations) == table.evaluations.iloc[-1]


def test_command_keeps_the_earlier_rules_reachable(checkpoints, tmp_path, capsys):
    options = ["--sigma-scale", "absolute", "--criterion", "error", "--epsilon-rule", "additive", "--tolerance", "0.1"]
    assert command(checkpoints, tmp_path / "out", *options) == 0
    table = pd.read_csv(tmp_path / "out" / "module_criticality.csv")
    evaluations = pd.read_csv(tmp_path / "out" / "evaluations.csv")
    assert (table.sigma_scale == "absolute").all() and (evaluations.noise_std == evaluations.sigma).all()
    assert table.epsilon.iloc[0] == pytest.approx(evaluations.original.iloc[0] + 0.1)


def test_the_fashion_mnist_training_split_is_a_data_spec_of_its_own():
    train, test = load_data("fashion-mnist-train", images=8), load_data("fashion-mnist", images=8)
    images, labels = load_fashion_mnist("train")
    chosen = subset_indices(len(labels), 8, 0)
    assert torch.equal(train.images, images[chosen]) and torch.equal(train.labels, labels[chosen])
    assert train.data_id == "fashion-mnist-train-n8-s0" and test.data_id == "fashion-mnist-test-n8-s0"
    assert len(labels) == 60_000


def test_command_reports_a_bad_grid_in_one_line(tmp_path, capsys):
    code = main(["module-criticality", "--model", "layercrit:fmnist_resnet8", "--no-pretrained", "--init", "x.pth",
                 "--data", "fashion-mnist", "--alphas", "0,half", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "layercrit: error: --alphas '0,half': give numbers, comma separated"


# ---------------------------------------------------------------- a case known in closed form


class QuadraticLoss(nn.Module):
    """Linear regression onto a teacher, dressed as a classifier whose cross-entropy is the squared error plus 1.

    With x = 2·image − 1 (entries in [−1, 1]) and q = 1 + (fc(x) − teacher·x)², the logits (0, log(e^q − 1))
    give label 0 the cross-entropy log(1 + e^q − 1) = q exactly.
    """

    def __init__(self, teacher: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(len(teacher), 1)
        self.register_buffer("teacher", teacher)

    def forward(self, images):
        x = 2 * images.flatten(1) - 1
        q = 1 + (self.fc(x).squeeze(1) - x @ self.teacher) ** 2
        return torch.stack([torch.zeros_like(q), torch.log(torch.expm1(q))], dim=1)


def test_criticality_of_a_linear_module_under_squared_error_is_the_closed_form_minimum(tmp_path):
    """For θ = (w, b) and x̃ = (x, 1), with θ^F the teacher (loss 1) and u ~ N(0, s²I):

        E_u[L(θ^α + u)] = 1 + (1 − α)²·a + s²·c,   a = mean_j ((θ⁰ − θ^F)·x̃_j)²,  c = mean_j ‖x̃_j‖²,

    ε = 1.01 × 1, and a relative σ means s = σ·‖θ^F‖/√k. θ⁰ is placed so that a = 0.1, and the σ grid so that s²c
    takes the values below: the feasible points and μ = α²‖θ⁰ − θ^F‖²/s² follow by hand. Every grid point's
    expectation is at least 10% of its excess over 1 away from ε, while the Monte Carlo estimate (20 draws of a
    1025-dimensional u) has a relative sd of about 1% of that excess: we require agreement within 4%.
    """
    d, n = 1024, 512
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(d, generator=generator) / 32
    net = QuadraticLoss(teacher)
    with torch.no_grad():
        net.fc.weight.copy_(teacher[None])
        net.fc.bias.zero_()
    images = torch.rand(n, 1, 1, d, generator=generator)
    x = torch.cat([2 * images.flatten(1) - 1, torch.ones(n, 1)], dim=1).double()
    direction = torch.randn(d + 1, generator=generator).double()
    delta = direction * math.sqrt(0.1 / ((x @ direction) ** 2).mean())  # a = 0.1
    torch.save({"fc.weight": (teacher + delta[:-1]).float()[None], "fc.bias": delta[-1:].float()}, tmp_path / "init.pth")
    c = float((x**2).sum(1).mean())
    scale = float(teacher.double().norm()) / math.sqrt(d + 1)
    noise_terms = [0.02, 0.008, 0.005, 0.003]  # s²c at each σ of the grid
    sigmas = [math.sqrt(term / c) / scale for term in noise_terms]
    alphas = [0.0, 0.5, 0.8, 0.9, 1.0]

    def closed_form(alpha, term):
        return 1 + (1 - alpha) ** 2 * 0.1 + term

    assert all(abs(closed_form(a, t) - 1.01) > 0.1 * (closed_form(a, t) - 1) for a in alphas for t in noise_terms)
    distance = float(delta.norm())
    feasible = [(alpha**2 * distance**2 * c / term, alpha, sigma)
                for alpha in alphas for term, sigma in zip(noise_terms, sigmas, strict=True)
                if closed_form(alpha, term) <= 1.01]
    mu, alpha, sigma = min(feasible)
    assert (alpha, noise_terms[sigmas.index(sigma)]) == (0.9, 0.008)  # by hand: 0.81/0.008 beats 0.64/0.005, 1/0.008

    seen = []
    table = module_criticality(net, (images, torch.zeros(n, dtype=torch.long)), init=tmp_path / "init.pth",
                               layers="fc", alphas=alphas, sigmas=sigmas, draws=20, batch_size=n,
                               on_evaluations=seen.append).set_index("layer")
    assert table.loc["fc", "mu"] == pytest.approx(mu, rel=1e-5)
    assert (table.loc["fc", "alpha"], table.loc["fc", "sigma"]) == (alpha, sigma)
    assert table.loc["fc", "distance"] == pytest.approx(distance, rel=1e-5)
    assert table.loc["fc", "epsilon"] == pytest.approx(1.01, rel=1e-6)
    evaluated = seen[-1]
    exact = closed_form(evaluated.alpha, evaluated.noise_std**2 * c)
    np.testing.assert_allclose(evaluated.expected - 1, exact - 1, rtol=0.04)


# ---------------------------------------------------------------- the zoo: stable across seeds

SPREAD = "conv1,layer1.0.conv1,layer2.0.conv1,layer2.0.downsample.0,layer3.0.conv1,layer3.0.downsample.0,fc"


@pytest.mark.slow
def test_the_ranking_of_a_zoo_models_modules_is_stable_across_seeds(tmp_path):
    """The paper's procedure on `zoo:fmnist/baseline`, from a fresh seeded initialisation: the stem, the first conv
    of each stage, both shortcuts and the classifier, ranked by μ on 512 training images (4 draws, α ∈ {0.5, 1},
    relative σ ∈ {0.08, 0.04, 0.02, 0.01}: the converged zoo's training loss is low, so ε = 1.01 × it leaves
    room only for small noise). A seed changes the images and the noise. Over the 6 pairs of seeds 0–3 the
    Spearman ρ ranged from 0.89 to 1.0 (with 128 images, 0.43 to 1.0); we require ρ ≥ 0.8 between seeds 0 and 1."""
    resolved = layercrit.resolve_model("zoo:fmnist/baseline")
    torch.manual_seed(0)
    torch.save(resolved.fresh().state_dict(), tmp_path / "init.pth")
    ranks = []
    for seed in (0, 1):
        table = module_criticality(resolved, "fashion-mnist-train", init=tmp_path / "init.pth", layers=SPREAD,
                                   alphas=[0.5, 1.0], sigmas=[0.08, 0.04, 0.02, 0.01], draws=4, images=512, seed=seed,
                                   batch_size=256)
        assert table.data_id.iloc[0] == f"fashion-mnist-train-n512-s{seed}"
        ranks.append(table[table.layer != "network"].mu.to_numpy())
    assert stats.spearmanr(*ranks).statistic >= 0.8
