"""Module criticality (Chatterji et al.): the grid search, its bound, its sum, and the command line."""

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import layercrit
from layercrit.cli import main
from layercrit.errors import LayercritError
from layercrit.layers import select_layers
from layercrit.models import Preprocessing, wrap_module
from layercrit.module_criticality import module_criticality
from layercrit.resets import Interpolate, Noise, Reinit

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


def test_criticality_is_the_grid_minimum_that_a_brute_force_search_finds(trained):
    resolved, data, path = trained
    table = criticality(trained).set_index("layer")
    layers = select_layers(resolved.model)
    initial = Reinit(checkpoint=path)
    expected = {}
    for alpha in ALPHAS:
        for sigma in SIGMAS:
            reset = Noise(sigma=sigma, base=Interpolate(alpha=1 - alpha, base=initial))
            rows = layercrit.measure(resolved, data, layers=layers, reset=reset, trials=2, batch_size=64)
            error = (100 - rows.top1_acc) / 100
            bound = error.iloc[0] + 0.05
            for layer, value in error[rows.layer != "original"].groupby(rows.layer).mean().items():
                if value <= bound:
                    mu = alpha**2 * table.loc[layer, "distance"] ** 2 / sigma**2
                    expected.setdefault(layer, []).append((mu, alpha, -sigma))
    for layer in layers:
        mu, alpha, negative_sigma = min(expected[layer])
        assert table.loc[layer, "mu"] == pytest.approx(mu)
        assert (table.loc[layer, "alpha"], table.loc[layer, "sigma"]) == (alpha, -negative_sigma)
    assert table.loc["model.conv2", "mu"] > 0


def test_alpha_runs_from_the_initial_weights_to_the_trained_ones(trained):
    """At σ → 0 the expected error at α is the error with the layer set to (1 − α)·θ⁰ + α·θ^F, by hand."""
    resolved, (images, labels), path = trained
    initial = torch.load(path)
    fc = resolved.model.model.fc
    table = module_criticality(resolved, (images, labels), init=path, layers="fc", alphas=[0.25], sigmas=[1e-9],
                               draws=1, epsilon=1.0, batch_size=64)
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


def test_default_epsilon_is_the_trained_error_plus_the_tolerance(trained):
    resolved, (images, labels), _ = trained
    with torch.no_grad():
        error = (resolved.model(images.float() / 255).argmax(1) != labels).float().mean().item()
    table = criticality(trained, tolerance=0.1)
    assert table.epsilon.nunique() == 1 and table.epsilon.iloc[0] == pytest.approx(error + 0.1)


def test_a_looser_bound_never_makes_a_module_more_critical(trained):
    strict = criticality(trained, tolerance=0.0).set_index("layer").mu
    loose = criticality(trained, tolerance=0.3).set_index("layer").mu
    assert (loose <= strict).all() and (loose < strict).any()


def test_a_bound_no_grid_point_meets_gives_infinite_criticality(trained):
    table = criticality(trained, epsilon=-1.0)
    assert table.mu.map(math.isinf).all() and table.alpha.isna().all()


def test_every_grid_evaluation_is_handed_over_as_it_finishes(trained):
    seen = []
    table = criticality(trained, on_evaluations=seen.append)
    assert len(seen) > 1 and len(seen[-1]) == table.iloc[-1].evaluations
    assert list(seen[-1].columns) == ["layer", "alpha", "sigma", "expected", "original"]


@pytest.mark.parametrize(("options", "message"), [
    ({"criterion": "accuracy"}, r"unknown criterion 'accuracy': one of error, loss"),
    ({"alphas": [0.5, 1.5]}, r"module criticality needs alphas in \[0, 1\]"),
    ({"sigmas": [0.1, 0.0]}, r"module criticality needs sigmas > 0"),
    ({"draws": 0}, r"at least one noise draw \(--draws\)"),
])
def test_bad_options_are_one_line_errors(trained, options, message):
    with pytest.raises(LayercritError, match=message):
        criticality(trained, **options)


def test_a_missing_initial_checkpoint_is_an_error(trained, tmp_path):
    resolved, data, _ = trained
    with pytest.raises(LayercritError, match=r"checkpoint not found: .*nowhere\.pth"):
        module_criticality(resolved, data, init=tmp_path / "nowhere.pth")


def test_command_writes_the_table_and_the_evaluations(tmp_path, capsys):
    torch.manual_seed(0)
    net = layercrit.resolve_model("layercrit:fmnist_resnet8", pretrained=False).model.model
    torch.save(net.state_dict(), tmp_path / "init.pth")
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    torch.save(net.state_dict(), tmp_path / "final.pth")
    code = main(["module-criticality", "--model", str(tmp_path / "final.pth"), "--arch", "layercrit:fmnist_resnet8",
                 "--init", str(tmp_path / "init.pth"), "--data", "fashion-mnist", "--images", "16",
                 "--layers", "conv1,fc", "--alphas", "0,1", "--sigmas", "0.1,0.01", "--draws", "1",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "network" in out and "epsilon" in out
    table = pd.read_csv(tmp_path / "out" / "module_criticality.csv")
    assert list(table.layer) == ["model.conv1", "model.fc", "network"]
    evaluations = pd.read_csv(tmp_path / "out" / "evaluations.csv")
    assert len(evaluations) == table.evaluations.iloc[-1]


def test_command_reports_a_bad_grid_in_one_line(tmp_path, capsys):
    code = main(["module-criticality", "--model", "layercrit:fmnist_resnet8", "--no-pretrained", "--init", "x.pth",
                 "--data", "fashion-mnist", "--alphas", "0,half", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "layercrit: error: --alphas '0,half': give numbers, comma separated"
