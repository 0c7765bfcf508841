"""The Fashion-MNIST zoo: training members into a folder, the shipped members, and zoo:fmnist/ID specs."""

import copy
import json
import math
import shutil

import pytest
import torch
import yaml

from layercrit import cli, resolve_model, training
from layercrit.analysis.tables import registry_meta
from layercrit.data import load_fashion_mnist, subset_indices
from layercrit.errors import LayercritError
from layercrit.measurement.layers import select_layers
from layercrit.training import accuracy
from layercrit.zoo import fmnist

SHIPPED = fmnist.zoo_dir()
CHECK_IMAGES = 1000


def tiny(recipe_id: str, **hyperparameters) -> dict:
    """A zoo recipe shrunk to seconds: ResNet-8, 64 training images."""
    recipe = copy.deepcopy(next(r for r in fmnist.RECIPES if r["id"] == recipe_id))
    recipe.update(arch="layercrit:fmnist_resnet8", train_images=64)
    recipe["hyperparameters"].update(hyperparameters)
    return recipe


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A zoo folder with a tiny baseline and frozen-random member, trained once for the module."""
    folder, lines = tmp_path_factory.mktemp("trained"), []
    table = fmnist.train_zoo(folder, recipes=[tiny("baseline", epochs=1), tiny("frozen_random", probe={"epochs": 2})],
                             test_images=200, log=lines.append)
    return folder, table, lines


@pytest.fixture
def trained_zoo(trained_once, tmp_path, monkeypatch):
    """A copy of that zoo folder for one test (which may retrain into it), used as zoo:fmnist/ID."""
    folder, table, lines = trained_once
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    monkeypatch.setenv("LAYERCRIT_FMNIST_ZOO", str(tmp_path))
    return tmp_path, table.copy(), list(lines)


# ---------------------------------------------------------------- training into a folder


def test_trained_member_is_written_with_its_record_and_resolves_to_the_measured_weights(trained_zoo):
    folder, table, lines = trained_zoo
    records = yaml.safe_load((folder / "manifest.yaml").read_text())["models"]
    assert [r["id"] for r in records] == ["baseline", "frozen_random"] == list(table["id"])
    baseline = records[0]
    assert (folder / baseline["file"]).is_file()
    assert baseline["test_images"] == 200 and baseline["seed"] == 0 and baseline["storage"] == "float16"
    assert baseline["hyperparameters"]["epochs"] == 1 and baseline["train_time_s"] >= 0  # may round to 0.0 s
    assert lines[0].startswith("baseline") and f"{baseline['accuracy']:.2f}%" in lines[0]
    assert 0 <= baseline["probe_accuracy"] <= 100, "a linear probe on its frozen features, the SimCLR reference"
    assert "probe_accuracy" not in records[1], "frozen_random's classifier is itself a probe"

    resolved = resolve_model("zoo:fmnist/baseline")
    assert resolved.spec == "zoo:fmnist/baseline"
    assert resolved.metadata["category"] == "baseline" and resolved.metadata["accuracy"] == baseline["accuracy"]
    assert all(p.dtype == torch.float32 for p in resolved.model.parameters())
    images, labels = load_fashion_mnist("test")
    assert accuracy(resolved.model, images[:200], labels[:200]) == pytest.approx(baseline["accuracy"], abs=0.005)


def test_retraining_one_member_replaces_its_record_and_keeps_the_others(trained_zoo):
    folder, _, _ = trained_zoo
    fmnist.train_zoo(folder, methods=["baseline"], recipes=[tiny("baseline", epochs=0.5)], seed=3, test_images=100,
                     log=lambda line: None)
    records = yaml.safe_load((folder / "manifest.yaml").read_text())["models"]
    assert [r["id"] for r in records] == ["baseline", "frozen_random"]
    assert records[0]["seed"] == 3 and records[0]["test_images"] == 100
    assert records[1]["seed"] == 0 and records[1]["test_images"] == 200


def test_a_seed_replicate_trained_into_a_seed_folder_resolves_as_id_at_seed(trained_zoo, capsys):
    folder, _, _ = trained_zoo
    fmnist.train_zoo(folder / "seed1", recipes=[tiny("baseline", epochs=1)], seed=1, precision="fp32",
                     test_images=200, robust_images=0, log=lambda line: None)
    record = yaml.safe_load((folder / "seed1" / "manifest.yaml").read_text())["models"][0]
    assert record["seed"] == 1 and record["hyperparameters"]["precision"] == "fp32"
    assert record["recipe_precision"] == "bf16", "the precision the recipe asks for stays on record"

    assert [r["id"] for r in fmnist.entries()] == ["baseline", "frozen_random"]
    assert [r["id"] for r in fmnist.entries(replicates=True)] == ["baseline", "frozen_random", "baseline@seed1"]
    replicate = resolve_model("zoo:fmnist/baseline@seed1")
    assert replicate.spec == "zoo:fmnist/baseline@seed1"
    assert replicate.metadata["seed"] == 1 and replicate.metadata["accuracy"] == record["accuracy"]
    seed0, also_seed0 = resolve_model("zoo:fmnist/baseline"), resolve_model("zoo:fmnist/baseline@seed0")
    weight = "model.conv1.weight"
    assert torch.equal(seed0.model.state_dict()[weight], also_seed0.model.state_dict()[weight])
    assert not torch.equal(seed0.model.state_dict()[weight], replicate.model.state_dict()[weight])

    known = registry_meta(["zoo:fmnist/baseline@seed1"])
    assert known.accuracy.tolist() == [record["accuracy"]] and known.category.tolist() == ["baseline"]

    assert cli.main(["zoo", "list", "--seeds"]) == 0
    assert [row.split()[0] for row in capsys.readouterr().out.splitlines()[1:]] == [
        "baseline", "frozen_random", "baseline@seed1"]
    with pytest.raises(LayercritError, match="no model 'baseline@seed7'.*did you mean baseline@seed1"):
        resolve_model("zoo:fmnist/baseline@seed7")


def test_a_seed_folder_holding_another_seed_is_refused(trained_zoo):
    folder, _, _ = trained_zoo
    (folder / "seed2").mkdir()
    (folder / "seed2" / "manifest.yaml").write_text((folder / "manifest.yaml").read_text())
    with pytest.raises(LayercritError, match="seed2/manifest.yaml holds 'baseline' trained with seed 0"):
        fmnist.entries(replicates=True)


def test_an_unknown_training_precision_is_refused_in_one_line(tmp_path):
    with pytest.raises(LayercritError, match="unknown training precision 'fp16': one of fp32, bf16"):
        fmnist.train_zoo(tmp_path, recipes=[tiny("baseline", epochs=1)], precision="fp16", log=lambda line: None)


def test_members_are_chosen_by_id_method_or_category():
    ids = lambda names: [r["id"] for r in fmnist.select_recipes(names)]  # noqa: E731
    assert ids(["baseline", "contrastive"]) == ["baseline", "simclr"]
    assert ids(["adversarial"]) == [r["id"] for r in fmnist.RECIPES if r["method"] == "adversarial"]
    assert ids(None) == [r["id"] for r in fmnist.RECIPES]
    with pytest.raises(LayercritError, match="unknown zoo member 'pgd': give ids, methods or categories from"):
        fmnist.select_recipes(["baseline", "pgd"])


def test_zoo_train_command_reports_an_unknown_member_in_one_line(capsys):
    assert cli.main(["zoo", "train", "--methods", "resnet50", "--out", "unused"]) == 2
    assert capsys.readouterr().err.startswith("layercrit: error: unknown zoo member 'resnet50'")


# ---------------------------------------------------------------- the shipped zoo


def test_shipped_zoo_covers_every_training_method_of_the_issue():
    records = fmnist.entries()
    categories = [r["category"] for r in records]
    norms = [r["hyperparameters"].get("norm") for r in records if r["category"] == "adversarial_training"]
    assert categories.count("baseline") == 1 and "training_recipes" in categories
    assert categories.count("augmentation") >= 2
    assert norms.count("linf") >= 3 and norms.count("l2") >= 2
    assert {"contrastive", "freezing"} <= set(categories)
    for record in records:
        assert (SHIPPED / record["file"]).is_file()
        assert {"display", "method", "seed", "train_time_s", "cpu_time_s", "test_images"} <= record.keys()


def test_shipped_zoo_is_trained_to_the_issues_targets():
    """Issue 14: the whole training split; baseline >= 91% on all 10,000 test images; the improved recipe above it;
    adversarial members robust under PGD-10 at their own budget beyond the baseline there, L∞ 8/255 still >= 80%
    clean; SimCLR's probe stated beside a supervised probe."""
    records = {r["id"]: r for r in fmnist.entries()}
    table = fmnist.summary().set_index("id")
    assert all(r["train_images"] == 60_000 and r["test_images"] == 10_000 for r in records.values())
    assert table.loc["baseline", "accuracy"] >= 91
    assert table.loc["improved", "accuracy"] > table.loc["baseline", "accuracy"]
    adversarial = table[table.category == "adversarial_training"]
    assert len(adversarial) == 5 and (adversarial.robust_accuracy > adversarial.baseline_robust_accuracy).all()
    assert table.loc["pgd_linf_8", "accuracy"] >= 80
    assert all(r["robust_attack"].startswith("PGD-10") for r in records.values())
    assert table.loc[["simclr", "baseline"], "probe_accuracy"].notna().all()


def shipped_records() -> list:
    """Every shipped member: the fast tier loads three (supervised, adversarial, self-supervised), CI all."""
    records = fmnist.entries(replicates=True) if (SHIPPED / fmnist.MANIFEST).is_file() else []
    fast = {"baseline", "pgd_linf_8", "simclr"}
    return [pytest.param(r, id=r["id"], marks=() if r["id"] in fast else pytest.mark.slow) for r in records]


@pytest.mark.parametrize("record", shipped_records())
def test_shipped_model_reaches_its_recorded_accuracy_on_a_test_subset(record):
    images, labels = load_fashion_mnist("test")
    chosen = torch.tensor(subset_indices(len(labels), CHECK_IMAGES, seed=1))
    measured = accuracy(resolve_model(f"zoo:fmnist/{record['id']}").model, images[chosen], labels[chosen])
    p = record["accuracy"] / 100
    # A random 1000 of the 10000 images the record was measured on: 4 binomial standard errors.
    assert abs(measured - record["accuracy"]) <= 400 * math.sqrt(p * (1 - p) / CHECK_IMAGES)
    assert record["accuracy"] > 20  # far above chance (10 classes)


def test_zoo_model_rerandomizes_from_fresh_instances_of_its_architecture():
    resolved = resolve_model("zoo:fmnist/baseline")
    fresh = resolved.fresh()
    assert fresh.state_dict().keys() == resolved.model.state_dict().keys()
    assert not torch.equal(fresh.state_dict()["model.conv1.weight"], resolved.model.state_dict()["model.conv1.weight"])
    names = select_layers(resolved.model, "conv,linear")
    assert names[0] == "model.conv1" and names[-1] == "model.fc" and "model.layer2.0.downsample.0" in names
    assert len(names) == 22


def test_zoo_list_prints_every_member_with_category_and_accuracy(capsys):
    assert cli.main(["zoo", "list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:3] == ["id", "category", "accuracy"]
    for record, row in zip(fmnist.entries(), rows[1:], strict=True):
        model_id, category, shown = row.split()[:3]
        assert (model_id, category, float(shown)) == (record["id"], record["category"], record["accuracy"])


def test_the_zoo_summary_sets_each_member_beside_the_baseline_at_its_own_budget():
    hp = {"epochs": 4}
    records = [
        {"id": "base", "category": "baseline", "method": "supervised", "hyperparameters": hp, "accuracy": 92.0,
         "probe_accuracy": 92.5, "robust_accuracy": {"linf 8/255": 0.5, "l2 0.5": 20.0}, "train_time_s": 120},
        {"id": "adv", "category": "adversarial_training", "method": "adversarial", "hyperparameters": hp,
         "budget": "l2 0.5", "accuracy": 88.0, "probe_accuracy": 87.0, "robust_accuracy": {"l2 0.5": 70.0}},
        {"id": "ssl", "category": "contrastive", "method": "simclr", "hyperparameters": hp, "accuracy": 85.0},
    ]
    table = fmnist.summary(records).set_index("id")
    assert table.loc["adv", ["robust_accuracy", "baseline_robust_accuracy"]].tolist() == [70.0, 20.0]
    assert table.loc["ssl", "probe_accuracy"] == 85.0, "SimCLR's classifier is its linear probe"
    assert table.loc["base", "train_min"] == 2.0 and math.isnan(table.loc["ssl", "robust_accuracy"])


# ---------------------------------------------------------------- mistakes


def test_unknown_member_names_the_closest_ids():
    with pytest.raises(LayercritError, match=r"no model 'baselin' in the Fashion-MNIST zoo \(did you mean baseline\?\)"):
        resolve_model("zoo:fmnist/baselin")


def test_missing_zoo_folder_says_how_to_train_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCRIT_FMNIST_ZOO", str(tmp_path / "nowhere"))
    with pytest.raises(LayercritError, match="no Fashion-MNIST zoo in .*nowhere: train one with 'layercrit zoo train"):
        fmnist.entries()


def test_missing_weights_file_is_named(trained_zoo):
    folder, _, _ = trained_zoo
    (folder / "baseline.safetensors").unlink()
    with pytest.raises(LayercritError, match=r"zoo weights missing: .*baseline.safetensors \(retrain with"):
        resolve_model("zoo:fmnist/baseline")


@pytest.mark.slow  # training: CI runs it
def test_a_member_already_trained_with_the_same_recipe_and_seed_is_skipped_unless_forced(trained_zoo):
    folder, _, _ = trained_zoo
    lines = []
    before = (folder / "baseline.safetensors").stat().st_mtime_ns
    table = fmnist.train_zoo(folder, methods=["baseline"], recipes=[tiny("baseline", epochs=1)], test_images=200,
                             log=lines.append)
    assert table.empty and "already trained" in lines[0]
    assert (folder / "baseline.safetensors").stat().st_mtime_ns == before
    forced = fmnist.train_zoo(folder, methods=["baseline"], recipes=[tiny("baseline", epochs=1)], test_images=200,
                              force=True, log=lines.append)
    assert list(forced.id) == ["baseline"]


class _Killed(Exception):
    pass


@pytest.mark.parametrize("recipe", [tiny("baseline", epochs=3), tiny("simclr", epochs=2, probe={"epochs": 2})],
                         ids=["supervised", "simclr then probe"])
@pytest.mark.slow
def test_killed_training_goes_on_from_its_last_epoch_with_the_same_weights(tmp_path, monkeypatch, recipe):
    uninterrupted = fmnist.train_zoo(tmp_path / "a", recipes=[recipe], test_images=100, log=lambda line: None)
    step = torch.optim.SGD.step
    calls = []

    def dies_in_the_second_epoch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 + 1:  # 64 images / batch 128: one step per epoch; die in the third call
            raise _Killed
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", dies_in_the_second_epoch)
    with pytest.raises(_Killed):
        fmnist.train_zoo(tmp_path / "b", recipes=[recipe], test_images=100, log=lambda line: None)
    assert list((tmp_path / "b" / ".checkpoints" / recipe["id"]).glob("stage-*.pt"))
    before = json.loads((tmp_path / "b" / ".checkpoints" / recipe["id"] / "elapsed.json").read_text())
    monkeypatch.undo()
    resumed = fmnist.train_zoo(tmp_path / "b", recipes=[recipe], test_images=100, log=lambda line: None)
    # the recorded time is the member's, summed over both runs (the first one counted up to its last epoch; the
    # sum itself: test_the_training_clock_adds_the_time_of_earlier_runs)
    assert resumed.train_time_s.item() >= round(before["seconds"], 1)
    assert resumed.losses.tolist() == uninterrupted.losses.tolist()
    assert resumed.accuracy.tolist() == uninterrupted.accuracy.tolist()
    weights = f"{recipe['id']}.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    assert not (tmp_path / "b" / ".checkpoints" / recipe["id"]).exists()


# ---------------------------------------------------------------- resuming only the same training


KILLED_RECIPE = tiny("baseline", epochs=3)


@pytest.fixture(scope="module")
def killed_zoo(tmp_path_factory):
    """A zoo folder whose baseline (seed 0) was killed in its second epoch: its checkpoints are on disk."""
    folder = tmp_path_factory.mktemp("killed")
    step = torch.optim.SGD.step
    calls = []

    def dies_in_the_second_epoch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # 64 images / batch 128: one step per epoch
            raise _Killed
        return step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", dies_in_the_second_epoch)
        with pytest.raises(_Killed):
            fmnist.train_zoo(folder, recipes=[KILLED_RECIPE], test_images=100, log=lambda line: None)
    assert (folder / ".checkpoints" / "baseline" / "stage-0.pt").is_file()
    return folder


@pytest.fixture
def killed(killed_zoo, tmp_path):
    shutil.copytree(killed_zoo, tmp_path / "zoo")
    return tmp_path / "zoo"


@pytest.mark.parametrize(("seed", "recipe", "difference"), [
    (1, KILLED_RECIPE, "seed 0, not 1"),
    (0, tiny("baseline", epochs=3, lr=0.05), "recipe.hyperparameters.lr 0.1, not 0.05"),
    (0, {**KILLED_RECIPE, "train_images": 32}, "recipe.train_images 64, not 32"),
], ids=["seed", "learning rate", "data"])
def test_a_killed_training_is_not_continued_by_a_run_with_other_settings(killed, seed, recipe, difference):
    before = {p.name: p.read_bytes() for p in (killed / ".checkpoints" / "baseline").iterdir()}
    with pytest.raises(LayercritError) as error:
        fmnist.train_zoo(killed, recipes=[recipe], seed=seed, test_images=100, log=lambda line: None)
    message = str(error.value)
    assert "\n" not in message and difference in message and "--force discards it" in message
    assert {p.name: p.read_bytes() for p in (killed / ".checkpoints" / "baseline").iterdir()} == before, \
        "the other run's checkpoints are kept"


@pytest.mark.slow
def test_force_discards_a_killed_training_of_other_settings_and_trains_the_asked_one_from_the_start(killed, tmp_path):
    lines = []
    forced = fmnist.train_zoo(killed, recipes=[KILLED_RECIPE], seed=1, force=True, test_images=100, log=lines.append)
    assert "discarding its unfinished training (--force)" in lines[0] and "seed 0, not 1" in lines[0]
    fresh = fmnist.train_zoo(tmp_path / "fresh", recipes=[KILLED_RECIPE], seed=1, test_images=100,
                             log=lambda line: None)
    assert forced.seed.item() == 1 and forced.losses.tolist() == fresh.losses.tolist()
    assert (killed / "baseline.safetensors").read_bytes() == (tmp_path / "fresh" / "baseline.safetensors").read_bytes()


@pytest.mark.parametrize(("name", "content"), [
    ("stage-0.pt", b""), ("stage-0.pt", "truncated"), ("stage-0.pt", bytes(range(256)) * 4),
    ("elapsed.json", b""), ("elapsed.json", b"{\"seconds\": "), ("elapsed.json", b"[1, 2]"),
    ("training.json", b"\x00\xff"),
], ids=["empty checkpoint", "truncated checkpoint", "random checkpoint", "empty clock", "truncated clock",
        "clock of another shape", "binary key"])
def test_an_unreadable_checkpoint_file_is_a_one_line_error_naming_it(killed, name, content):
    path = killed / ".checkpoints" / "baseline" / name
    if content == "truncated":
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(LayercritError) as error:
        fmnist.train_zoo(killed, recipes=[KILLED_RECIPE], test_images=100, log=lambda line: None)
    assert "\n" not in str(error.value) and str(path) in str(error.value) and "--force" in str(error.value)


def test_zoo_train_command_reports_an_unreadable_checkpoint_in_one_line(tmp_path, capsys):
    checkpoints = tmp_path / ".checkpoints" / "baseline"
    checkpoints.mkdir(parents=True)
    (checkpoints / "stage-0.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert cli.main(["zoo", "train", "--methods", "baseline", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{checkpoints / 'stage-0.pt'} is not a readable training checkpoint" in err


def test_the_training_clock_adds_the_time_of_earlier_runs(tmp_path, monkeypatch):
    now = {"wall": 100.0, "cpu": 10.0}
    monkeypatch.setattr(training.time, "perf_counter", lambda: now["wall"])
    monkeypatch.setattr(training.time, "process_time", lambda: now["cpu"])
    first = training.TrainingClock(tmp_path)
    now.update(wall=102.5, cpu=11.0)
    first.save()
    second = training.TrainingClock(tmp_path)
    now.update(wall=103.0, cpu=11.25)
    assert second.total() == (3.0, 1.25)
