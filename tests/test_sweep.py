"""Sweeps: config checks, units, workers (OOM, broken models), identical results for any number of local workers
and for Ray, and the sweep / status / export commands. Kills, full disks and hostile input: test_faults_sweep.py,
test_reliability_sweep.py."""

import json
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from layercrit import measure
from layercrit.cli import main
from layercrit.columns import COLUMNS
from layercrit.errors import LayercritError
from layercrit.measurement.layers import select_layers
from layercrit.models import Preprocessing, wrap_module
from layercrit.sweeps import worker as sweep_worker
from layercrit.sweeps.store import export_frame, status_frame
from layercrit.sweeps.sweep import (
    SweepConfig,
    SweepWorker,
    conflict,
    load_config,
    plan_units,
    resolve_entry,
    run_sweep,
)

from .conftest import TinyCNN

# Two randomly initialised Fashion-MNIST ResNet-8s (10 conv/linear layers each): 4 chunks x 2 trials x 2 models.
CONFIG = {
    "data": "fashion-mnist",
    "images": 64,
    "seed": 0,
    "layers": "conv,linear",
    "reset": "rerandomize",
    "trials": 2,
    "layers_per_unit": 3,
    "batch_size": 32,
    "models": [
        {"id": "a", "spec": "layercrit:fmnist_resnet8", "pretrained": False, "category": "first", "accuracy": 1.5},
        {"id": "b", "spec": "layercrit:fmnist_resnet8", "pretrained": False, "category": "second", "accuracy": 2.5},
    ],
}
N_UNITS = 16


def write_config(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**CONFIG, **changes}, sort_keys=False))
    return path


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("change", "message"), [
    ({"imgs": 5}, r"unknown key\(s\) imgs \(did you mean images\?\); the keys are layercrit run's options"),
    ({"data": None}, r"has no data: add 'data: /path/to/imagenet/val' \(or fashion-mnist\), or pass --data"),
    ({"models": []}, r"has no models: add 'models:' with a list of \{id: NAME, spec: MODEL_SPEC\}"),
    ({"models": [{"id": "x"}]}, r"model #1 needs an id and a spec"),
    ({"models": [{"id": "x", "spec": "s"}, {"id": "x", "spec": "t"}]}, r"model id 'x' appears twice"),
    ({"models": [{"id": "x", "spec": "s", "top1_acc": 76}]}, r"uses result column name\(s\) top1_acc as metadata"),
    ({"reset": ["rerandomize", "shuffle"]}, r"unknown reset 'shuffle'; use one or a list of rerandomize, zero"),
    ({"trials": 0}, r"trials=0: give at least 1"),
    ({"images": "many"}, r"images must be int or null, not 'many'"),
    ({"engine": "turbo"}, r"unknown engine 'turbo'"),
])
def test_config_mistakes_are_named_with_the_fix(tmp_path, change, message):
    with pytest.raises(LayercritError, match=message):
        load_config(write_config(tmp_path / "bad.yaml", **change))


def test_config_that_is_not_yaml_is_refused(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(LayercritError, match="cannot parse .*broken.yaml"):
        load_config(path)


def test_command_line_overrides_replace_config_keys_and_metadata_is_kept(tmp_path):
    config = load_config(write_config(tmp_path / "s.yaml"), data="/elsewhere", images=None, batch_size=8)
    assert (config.data, config.images, config.batch_size) == ("/elsewhere", 64, 8)
    assert config.models[0].metadata == {"category": "first", "accuracy": 1.5}
    assert SweepConfig.from_dict(config.to_dict()) == config


def test_models_resets_and_trials_may_be_added_to_a_store_but_nothing_else_changed(tmp_path):
    base = load_config(write_config(tmp_path / "s.yaml"))
    grown = SweepConfig.from_dict({**CONFIG, "reset": ["rerandomize", "zero"], "trials": 3, "models": [
        *CONFIG["models"], {"id": "c", "spec": "layercrit:fmnist_resnet20", "pretrained": False}]})
    assert conflict(base, grown) is None
    assert conflict(base, SweepConfig.from_dict({**CONFIG, "seed": 1})) == (
        "the store was made with seed=0, the config has 1")
    respecced = {**CONFIG, "models": [{**CONFIG["models"][0], "spec": "layercrit:fmnist_resnet20"}, CONFIG["models"][1]]}
    assert "model 'a' had spec='layercrit:fmnist_resnet8'" in conflict(base, SweepConfig.from_dict(respecced))
    assert "lacks (models may be added, not removed)" in conflict(base, SweepConfig.from_dict(
        {**CONFIG, "models": CONFIG["models"][:1]}))
    assert "trials may grow, not shrink" in conflict(base, SweepConfig.from_dict({**CONFIG, "trials": 1}))


# ---------------------------------------------------------------- units and models


def test_units_cover_every_reset_trial_and_layer_exactly_once():
    config = SweepConfig.from_dict({**CONFIG, "reset": ["rerandomize", "zero"], "layers_per_unit": 4})
    layers = [f"l{i}" for i in range(10)]
    units = plan_units("m", layers, config)
    covered = [(u.reset, u.trial, layer) for u in units for layer in u.layers]
    assert sorted(covered) == sorted((r, t, layer) for r in ("rerandomize", "zero") for t in range(2) for layer in layers)
    assert max(len(u.layers) for u in units) == 4
    assert len({(u.model_id, u.reset, u.trial, u.chunk) for u in units}) == len(units)


def test_random_initialisation_is_the_same_in_every_process_and_differs_between_models():
    a, b = (SweepConfig.from_dict(CONFIG).model(m) for m in ("a", "b"))
    torch.manual_seed(123)
    first = resolve_entry(a, seed=0).model.state_dict()
    torch.manual_seed(456)  # whatever state the process is in
    again = resolve_entry(a, seed=0).model.state_dict()
    other = resolve_entry(b, seed=0).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.conv1.weight"], other["model.conv1.weight"])


# ---------------------------------------------------------------- the worker


class RunsOutOfMemory(nn.Module):
    """TinyCNN that fails like the CPU allocator when a batch is larger than ``fits``."""

    def __init__(self, fits: int):
        super().__init__()
        self.net = TinyCNN()
        self.fits = fits

    def forward(self, x):
        if len(x) > self.fits:
            raise RuntimeError(f"DefaultCPUAllocator: not enough memory: you tried to allocate {len(x)} images")
        return self.net(x)


def worker_with_model(monkeypatch, fits: int) -> tuple[SweepWorker, list]:
    def build():
        return RunsOutOfMemory(fits)

    pre = Preprocessing(resize=None, crop=None, mean=(0.5,), std=(0.25,), in_chans=1, source="test")
    monkeypatch.setattr(sweep_worker, "resolve_entry", lambda entry, seed: wrap_module(build(), build, pre, "test:oom"))
    config = SweepConfig.from_dict({**CONFIG, "models": [{"id": "m", "spec": "test:oom"}], "batch_size": 32})
    layers = select_layers(build(), "conv,linear")
    return SweepWorker(config, "test"), plan_units("m", [f"model.{name}" for name in layers], config)


def test_out_of_memory_retries_at_half_batch_size_and_keeps_it(monkeypatch):
    worker, units = worker_with_model(monkeypatch, fits=10)
    first = worker.run(units[0])
    assert first.error is None
    assert first.batch_size == 8  # 32 -> 16 -> 8
    assert first.rows.n_images.iloc[0] == 64
    assert worker.run(units[1]).batch_size == 8


def test_out_of_memory_at_batch_size_one_fails_the_unit_with_the_reason(monkeypatch):
    worker, units = worker_with_model(monkeypatch, fits=0)
    outcome = worker.run(units[0])
    assert outcome.rows is None
    assert outcome.error.startswith("out of memory even at batch size 1 (RuntimeError: DefaultCPUAllocator")
    assert "Traceback" in outcome.detail


# ---------------------------------------------------------------- whole sweeps


def test_sweep_table_is_layercrit_measure_of_each_model(reference):
    config_path, _, results = reference
    config = load_config(config_path)
    assert len(results) == 2 * (1 + 10 * 2)
    for entry in config.models:
        expected = measure(resolve_entry(entry, config.seed), "fashion-mnist", layers="conv,linear", trials=2,
                           images=64, seed=0, model_id=entry.id, batch_size=32)
        got = results[results.model_id == entry.id][list(COLUMNS)].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert results.groupby("model_id").category.first().to_dict() == {"a": "first", "b": "second"}


@pytest.mark.slow
def test_two_local_workers_give_identical_results(reference, tmp_path):
    config, _, expected = reference
    results = run_sweep(config, tmp_path / "two.sqlite", workers=2, progress=False)
    pd.testing.assert_frame_equal(results, expected)
    workers = sqlite3.connect(tmp_path / "two.sqlite").execute("SELECT DISTINCT worker FROM units").fetchall()
    assert sorted(w for (w,) in workers) == ["local-0", "local-1"]


def test_rerunning_a_finished_sweep_recomputes_nothing(reference, tmp_path):
    config, store, expected = reference
    copy = shutil.copy(store, tmp_path / "copy.sqlite")
    results = run_sweep(config, copy, workers=1, progress=False)
    pd.testing.assert_frame_equal(results, expected)
    attempts = sqlite3.connect(copy).execute("SELECT attempts, COUNT(*) FROM units GROUP BY attempts").fetchall()
    assert attempts == [(1, N_UNITS)]


@pytest.mark.slow
def test_a_store_made_before_resets_carried_their_options_resumes_without_recomputing(tmp_path):
    """Earlier versions named a sweep's units by the bare reset (``noise``) and kept ``scale`` beside it."""
    small = {"models": CONFIG["models"][:1], "reset": "noise", "scale": 0.5, "trials": 1, "layers_per_unit": 10}
    config = write_config(tmp_path / "sweep.yaml", **small)
    store = tmp_path / "old.sqlite"
    expected = run_sweep(config, store, workers=1, progress=False)
    with sqlite3.connect(store) as db:  # as the previous version wrote it
        db.execute("UPDATE units SET reset = 'noise'")
        db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps({**CONFIG, **small}),))
    results = run_sweep(config, store, workers=1, progress=False)
    pd.testing.assert_frame_equal(results, expected)
    units = sqlite3.connect(store).execute("SELECT reset, attempts FROM units").fetchall()
    assert set(units) == {("noise(scale=0.5)", 1)}


def test_conflicting_config_is_refused_and_new_store_moves_the_old_one_aside(reference, tmp_path):
    _, store, expected = reference
    copy = Path(shutil.copy(store, tmp_path / "s.sqlite"))
    # a model that cannot be built has no units, so this sweep starts no worker
    other = write_config(tmp_path / "other.yaml", images=32, models=[{"id": "x", "spec": "layercrit:nope"}])
    with pytest.raises(LayercritError, match=(
            r"s.sqlite holds another sweep: the store was made with images=64, the config has 32; "
            r"use another --store, or --new-store to move this one aside and start anew")):
        run_sweep(other, copy, workers=1, progress=False)
    pd.testing.assert_frame_equal(export_frame(copy), expected)

    assert run_sweep(other, copy, workers=1, progress=False, new_store=True).empty
    assert status_frame(copy).model_id.tolist() == ["x"]
    (aside,) = tmp_path.glob("s.old-*.sqlite")
    pd.testing.assert_frame_equal(export_frame(aside), expected)


@pytest.mark.slow
def test_failed_units_are_recorded_and_the_sweep_goes_on(tmp_path):
    state = resolve_entry(SweepConfig.from_dict(CONFIG).model("a"), seed=0).model.model.state_dict()
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    config = write_config(tmp_path / "s.yaml", layers="model.fc,model.conv1", trials=1, layers_per_unit=1, models=[
        {"id": "good", "spec": "layercrit:fmnist_resnet8", "pretrained": False},
        {"id": "unknown", "spec": "layercrit:no_such_net", "pretrained": False},
        {"id": "nan", "spec": str(tmp_path / "nan.pt"), "arch": "layercrit:fmnist_resnet8"},
    ])
    results = run_sweep(config, tmp_path / "s.sqlite", workers=1, progress=False)
    assert set(results.model_id) == {"good"}
    status = status_frame(tmp_path / "s.sqlite").set_index("model_id")
    assert status.loc["good", ["done", "failed", "pending"]].tolist() == [2, 0, 0]
    assert status.loc["unknown", "units"] == 0
    assert status.loc["unknown", "error"].startswith("unknown layercrit architecture 'no_such_net'")
    assert status.loc["nan", ["done", "failed", "pending"]].tolist() == [0, 2, 0]
    assert status.loc["nan", "error"] == "the unmodified model gives non-finite outputs for 64 of 64 images (broken weights?)"


@pytest.mark.slow
def test_local_ray_with_two_cpus_gives_identical_results(reference, tmp_path):
    ray = pytest.importorskip("ray")
    config, _, expected = reference
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        results = run_sweep(config, tmp_path / "ray.sqlite", workers=2, backend="ray", progress=False)
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(results, expected)
    workers = sqlite3.connect(tmp_path / "ray.sqlite").execute("SELECT DISTINCT worker FROM units").fetchall()
    assert sorted(w for (w,) in workers) == ["ray-0", "ray-1"]


# ---------------------------------------------------------------- command line


def test_status_and_export_commands_show_and_write_the_store(reference, tmp_path, capsys):
    _, store, expected = reference
    assert main(["status", str(store)]) == 0
    shown = capsys.readouterr().out
    assert "units: 16 done, 0 failed, 0 pending of 16" in shown
    assert main(["export", str(store), "--out", str(tmp_path / "results.csv")]) == 0
    assert "42 rows of 2 model(s) written to" in capsys.readouterr().out
    written = pd.read_csv(tmp_path / "results.csv")
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    assert main(["export", str(store), "--out", str(tmp_path / "results.xlsx")]) == 2
    assert "unknown table format '.xlsx': use .csv, .parquet or .json" in capsys.readouterr().err


def test_dry_run_lists_units_and_models_that_cannot_be_built_without_writing(tmp_path, capsys):
    config = write_config(tmp_path / "s.yaml", models=[
        *CONFIG["models"], {"id": "gone", "spec": str(tmp_path / "missing.pt"), "arch": "layercrit:fmnist_resnet8"}])
    store = tmp_path / "s.sqlite"
    assert main(["sweep", str(config), "--store", str(store), "--dry-run"]) == 1
    shown = capsys.readouterr().out
    assert "16 of 16 units to run (1 reset(s) x 2 trial(s) x chunks of 3 layers)" in shown
    assert f"cannot measure gone: checkpoint not found: {tmp_path / 'missing.pt'}" in shown
    assert not store.exists()
