"""prepare → execute: every field of the Experiment reaches what it names, the prepared value is reused, and the
inputs a model gets are the ones it asked for and the printout names."""

import dataclasses
import itertools
import warnings

import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import layercrit
from layercrit.columns import METRIC_COLUMNS
from layercrit.errors import LayercritError
from layercrit.measurement.prepare import execute, prepare
from layercrit.models import Preprocessing, wrap_module
from layercrit.spec import FIELDS, Experiment

from .conftest import TinyCNN

# Fields no prepared measurement reads, with the consumer that does (and the test that shows it).
ELSEWHERE = {"log_to": "layercrit run and sweeps hand the rows to the tracker it names (tests/test_trackers.py)"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two image folders (ImageNet-val layout, 20x20 RGB): a clean one, and one with an unreadable file."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for name in ("clean", "broken"):
        for label in ("a", "b"):
            (root / name / label).mkdir(parents=True)
            for i in range(6):
                pixels = torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8, generator=generator).numpy()
                Image.fromarray(pixels).save(root / name / label / f"{i}.png")
    (root / "broken" / "a" / "bad.png").write_bytes(b"not a png")
    (root / "groups.yaml").write_text("head: [fc]\n")
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    pre = Preprocessing(resize=None, crop=None, mean=(0.5,) * 3, std=(0.25,) * 3, in_chans=3, source="test")
    return wrap_module(TinyCNN(in_chans=3).eval(), fresh=lambda: TinyCNN(in_chans=3), preprocessing=pre,
                       spec="test:tiny")


def cases(folders, tmp_path):
    """field -> (options both sides share, the field's other value): the other value must change what is prepared
    or what runs (or be refused)."""
    sequential = {"target_ci": 0.2, "trials": 2, "data": "fashion-mnist", "images": 64}  # a pilot: 2·trials blocks of 16
    logits = {"save_logits": str(tmp_path / "logits-k")}
    return {
        "data": ({}, "fashion-mnist"),
        "data_root": ({"data": "fashion-mnist"}, str(tmp_path / "nowhere")),
        "images": ({}, 5),
        "seq_len": ({}, 16),  # text only: refused for a model without a tokenizer (tests/test_lm_task.py: windows)
        "text_field": ({}, "body"),
        "cache_dir": ({}, None),
        "use_cache": ({}, False),
        "skip_bad_images": ({"data": str(folders / "broken")}, True),
        "resize": ({}, 16),
        "crop": ({}, 16),
        "interpolation": ({"resize": 16}, "nearest"),
        "normalize": ({}, False),
        "mean": ({}, {"mean": (0.3, 0.3, 0.3), "std": (0.2, 0.2, 0.2)}),
        "std": ({"mean": (0.3, 0.3, 0.3), "std": (0.2, 0.2, 0.2)}, (0.1, 0.1, 0.1)),
        "task": ({}, "sequence-classification"),
        "layers": ({}, "conv1"),
        "groups": ({}, str(folders / "groups.yaml")),
        "cumulative": ({"layers": "conv1,fc"}, "prefix"),
        "reset": ({}, "zero"),
        "bn": ({}, "reset"),
        "trials": ({}, 3),
        "seed": ({}, 1),
        "data_seed": ({}, 5),
        "target_ci": ({"trials": 2}, 0.2),
        "max_trials": (sequential, 5),
        "images_per_trial": (sequential, 3),
        "mirror": (sequential, False),
        "engine": ({}, "naive"),
        "precision": ({}, "bf16"),
        "batch_size": ({}, 7),
        "device": ({}, "cuda:7"),
        "max_cache_mb": ({}, 1.0),
        "compile": ({}, True),
        "exact": ({}, True),
        "channels_last": ({}, False),
        "fold_bn": ({}, False),
        "image_target_ci": ({}, 0.1),
        "save_logits": ({}, str(tmp_path / "logits")),
        "save_logits_top_k": (logits, 1),
        "log_batches": ({}, True),
        "per_class": ({}, str(tmp_path / "per_class.csv")),
    }


_CACHES = itertools.count()


def observe(model, spec: Experiment, tmp_path) -> object:
    """What a spec makes of the model and data: the prepared value, and when that says nothing of a field, the
    rows it gives and the files it writes (or the error it is refused with)."""
    cache = tmp_path / f"cache-{spec.spec_id()}-{next(_CACHES)}"  # not id(spec): a freed spec's id comes back
    if spec.cache_dir is not None:
        spec = dataclasses.replace(spec, cache_dir=str(cache))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare(model, spec=spec)
            before = {p.relative_to(tmp_path): p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()}
            seen = (signature(prepared), cache.exists() and any(cache.iterdir()))
            if spec.compile:  # compiling is slow: the prepared value shows it
                return seen
            rows = execute(prepared, progress=False).drop(columns=["layercrit_version", "spec_id"])
            written = {p.relative_to(tmp_path): p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()}
            return seen, rows.to_csv(index=False), {k: v for k, v in written.items() if before.get(k) != v}
    except LayercritError as error:
        return f"refused: {error}"


def signature(prepared) -> tuple:
    wrapper = prepared.model.model
    return (prepared.model.preprocessing, tuple(wrapper.mean.flatten().tolist()),
            tuple(wrapper.std.flatten().tolist()), prepared.evalset.data_id, prepared.evalset.transform,
            tuple(prepared.evalset.images.shape), prepared.task.name,
            [(t.name, t.modules) for t in prepared.targets], prepared.reset.describe(), prepared.trials,
            repr(dataclasses.replace(prepared.options, on_logits=None)), prepared.design,
            {key: value for key, value in prepared.labels.items() if key != "spec_id"})  # every field changes it


def test_every_experiment_field_changes_what_is_prepared_or_run(folders, model, tmp_path):
    table = cases(folders, tmp_path)
    assert set(table) | set(ELSEWHERE) == set(FIELDS), "a new Experiment field needs a case here (or a consumer)"
    base = {"data": str(folders / "clean"), "images": 8, "layers": "fc", "trials": 1, "batch_size": 4,
            "cache_dir": "per-run"}
    seen = {}  # spec → observation: the unchanged side is shared by most cases; measured once

    def observed(spec: Experiment) -> object:
        if repr(spec) not in seen:
            seen[repr(spec)] = observe(model, spec, tmp_path)
        return seen[repr(spec)]

    for name, (shared, other) in table.items():
        changed = other if isinstance(other, dict) else {name: other}
        before = observed(Experiment(**{**base, **shared}))
        after = observed(Experiment(**{**base, **shared, **changed}))
        assert before != after, f"Experiment.{name} reaches nothing: {name}={other!r} changes nothing"


def test_a_prepared_measurement_gives_what_measure_gives_and_its_units_add_up(model, tiny_data):
    spec = Experiment(layers="conv1,fc", trials=2, batch_size=16)
    prepared = prepare(model, tiny_data, spec)
    whole = execute(prepared, progress=False)
    assert whole.equals(layercrit.measure(model, tiny_data, spec, progress=False))
    names = [target.name for target in prepared.targets]
    assert names == ["model.conv1", "model.fc"]
    parts = [execute(prepared.select(layers=[layer], trials=[trial]), progress=False)
             for layer in names for trial in (0, 1)]
    columns = ["layer", "trial", *METRIC_COLUMNS]
    units = pd.concat([p[p.layer != "original"] for p in parts], ignore_index=True)[columns]
    expected = whole[whole.layer != "original"].sort_values(["layer", "trial"]).reset_index(drop=True)[columns]
    pd.testing.assert_frame_equal(units.sort_values(["layer", "trial"]).reset_index(drop=True), expected)
    assert prepared.memo, "the engine's memo is kept across the prepared value's units"


class Flat(nn.Module):
    """An MLP over flattened 1x28x28 images, as one trained on Fashion-MNIST in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.hidden = nn.Linear(784, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(self.flat(x))))


def test_a_bare_module_gets_its_inputs_as_they_are_and_the_printout_says_so():
    prepared = prepare(Flat(), "fashion-mnist", Experiment(images=20, trials=1))
    assert not isinstance(prepared.model.model, layercrit.models.Normalized)
    text = prepared.describe()
    assert "not normalised" in text and "nothing resized" in text and "Resize" not in text
    assert [t.name for t in prepared.targets] == ["hidden", "out"]  # the default kinds it has: no conv, no error
    normalised = prepare(Flat(), "fashion-mnist", Experiment(images=20, trials=1, mean=(0.5,), std=(0.25,)))
    assert "normalised: mean (0.5,), std (0.25,)" in normalised.describe()


def test_a_model_at_chance_is_warned_about(tiny_data):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with pytest.warns(UserWarning, match="at chance|near uniform"):
        layercrit.measure(model, tiny_data, layers="fc", trials=1, progress=False)


def test_tied_parameters_are_reported_in_the_rows_and_warned_about():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.embed(ids))).mean(1)) * 4

    torch.manual_seed(0)
    ids = torch.randint(0, 20, (16, 5))
    labels = torch.randint(0, 20, (16,))
    with pytest.warns(UserWarning, match="head shares parameters with embed"):
        rows = layercrit.measure(Tied().eval(), (ids, labels), task="sequence-classification", trials=1,
                                 reset="zero", progress=False)
    assert rows.set_index("layer").tied_with.fillna("").to_dict() == {"original": "", "mix": "", "head": "embed"}


def test_a_factory_in_the_current_folder_needs_no_pythonpath_and_gets_no_normalisation_it_did_not_ask_for(
        tmp_path, monkeypatch, capsys):
    import json
    import sys

    from .conftest import assert_one_line_error, run_cli

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r20_mynets.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build(pretrained=True):\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))\n")
    common = ["run", "--model", "r20_mynets:build", "--data", "fashion-mnist", "--images", 20, "--trials", 1,
              "--quiet"]
    code, out, err = run_cli(capsys, *common, "--out", tmp_path / "plain")
    assert code == 0, err
    assert "not normalised" in out and "nothing resized" in out and "Resize" not in out
    assert "model.1" in pd.read_csv(tmp_path / "plain" / "results.csv").layer.tolist()  # its linear layers
    recorded = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert "not normalised" in recorded["preprocessing"] and recorded["task"] == "image-classification"
    code, out, err = run_cli(capsys, *common, "--mean", 0.5, "--std", 0.25, "--out", tmp_path / "normalised")
    assert code == 0, err
    assert "normalised: mean (0.5,), std (0.25,)" in out
    code, _, err = run_cli(capsys, *common, "--mean", 0.5, "--out", tmp_path / "half")
    assert_one_line_error(code, err, "give mean and std together")


def test_zoo_metadata_is_matched_by_the_models_spec_never_by_an_id_a_user_chose():
    from layercrit.analysis.tables import registry_meta

    known = registry_meta(["baseline", "mine"], {"baseline": "runs/my_ckpt.pth", "mine": "zoo:fmnist/baseline"})
    assert list(known.model_id) == ["mine"] and known.registry.tolist() == ["zoo:fmnist"]


def test_a_sweep_config_takes_the_normalisation_as_keys_and_stores_them():
    from layercrit.sweeps.sweep import SweepConfig

    config = SweepConfig.from_dict({"data": "d", "models": [{"id": "m", "spec": "s"}], "mean": [0.5], "std": [0.25]})
    assert (config.experiment("rerandomize").mean, config.experiment("rerandomize").std) == ((0.5,), (0.25,))
    assert SweepConfig.from_dict(config.to_dict()) == config
    with pytest.raises(LayercritError, match="mean must be a list of numbers or null"):
        SweepConfig.from_dict({"data": "d", "models": [{"id": "m", "spec": "s"}], "mean": "x", "std": [0.25]})
