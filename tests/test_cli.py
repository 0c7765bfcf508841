"""`layercrit run`: outputs, the paper's method reproduced layer for layer, and one-line errors for user mistakes."""

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from layercrit.cli import main
from layercrit.measurement.resets import trial_seed

from .test_data import make_image_folder


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=3, zero_init_last=False)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def paper_method(checkpoint, folder, *, batch_size, num_batches, n_trials, seed, zero_weights):
    """The paper's main.py loop, transcribed (DataLoader over ImageFolder, shuffle seeded, one random model per
    trial), with the random model drawn under layercrit's per-trial seed so both draw the same weights."""
    import torchvision

    from layercrit.models import Normalized

    def normalized(pretrained):
        net = timm.create_model("resnet10t", num_classes=3)
        if pretrained:
            state = torch.load(checkpoint)["state_dict"]
            net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        return Normalized(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()

    def loader():
        transform = torchvision.transforms.Compose([torchvision.transforms.Resize(256),
                                                    torchvision.transforms.CenterCrop(224),
                                                    torchvision.transforms.ToTensor()])
        dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                           generator=torch.Generator().manual_seed(seed))

    def evaluate(model):
        logits, labels = [], []
        for i, (x, y) in enumerate(loader()):
            with torch.no_grad():
                logits.append(model(x))
            labels.append(y)
            if i + 1 >= num_batches:
                break
        return torch.cat(logits), torch.cat(labels)

    model = normalized(True)
    # The paper's code takes `model.state_dict().copy()`, whose tensors alias the live weights; it restores
    # correctly only because `model.to("cuda")` then moves the weights away from the backup. On the CPU we
    # need a real copy to get the behaviour the paper's GPU runs had.
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    original_logits, labels = evaluate(model)
    rows = []
    for trial in range(n_trials):
        with torch.random.fork_rng():
            torch.manual_seed(trial_seed(seed, trial))
            random_model = normalized(False)
        for name, module in model.named_modules():
            if type(module) not in (torch.nn.Conv2d, torch.nn.Linear):
                continue
            model.load_state_dict(state_dict)
            with torch.no_grad():
                if zero_weights:
                    for p in module.parameters():
                        p.data.zero_()
                else:
                    module.load_state_dict(random_model.get_submodule(name).state_dict())
            logits, _ = evaluate(model)
            a, b = F.softmax(original_logits, 1), F.softmax(logits, 1)
            rows.append({
                "layer": name, "trial": trial,
                "top1_acc": 100 * (logits.argmax(1) == labels).float().mean().item(),
                "loss": F.cross_entropy(logits, labels).item(),
                "pred_cos_sim": torch.nn.CosineSimilarity(dim=1)(a, b).mean().item(),
                "pred_l1_err": torch.norm(a - b, p=1, dim=1).mean().item(),
                "pred_ce_loss": torch.nn.CrossEntropyLoss()(original_logits, logits).item(),
            })
    model.load_state_dict(state_dict)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("reset", [pytest.param("zero", marks=pytest.mark.slow), "rerandomize"])
def test_run_on_a_checkpoint_reproduces_the_papers_method_layer_for_layer(tmp_path, capsys, checkpoint, reset):
    folder = make_image_folder(tmp_path / "val", n_per_class=4, size=(64, 48))
    code, out, err = run_cli(capsys, "run", "--model", checkpoint, "--arch", "timm:resnet10t", "--data", folder,
                             "--images", 8, "--batch-size", 4, "--resize", 256, "--crop", 224, "--reset", reset, "--trials", 1,
                             "--out", tmp_path / "out", "--quiet", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    ours = pd.read_csv(tmp_path / "out" / "results.csv")
    assert ours.equals(pd.read_parquet(tmp_path / "out" / "results.parquet"))
    theirs = paper_method(checkpoint, folder, batch_size=4, num_batches=2, n_trials=1, seed=0,
                          zero_weights=reset == "zero")
    merged = theirs.merge(ours, on=["layer", "trial"], suffixes=("_paper", ""))
    assert len(merged) == len(theirs) == len(ours) - 1 > 10
    assert (merged.top1_acc_paper - merged.top1_acc).abs().max() <= 100 / 8  # within one image
    for metric in ("pred_cos_sim", "pred_l1_err", "pred_ce_loss", "loss"):
        assert np.allclose(merged[f"{metric}_paper"], merged[metric], atol=1e-4), metric
    assert "most critical layers" in out and "results:" in out


@pytest.mark.slow  # the CLI path of what test_engine checks bit for bit
def test_exact_makes_the_fast_engine_equal_the_naive_engine_bit_for_bit(tmp_path, capsys, checkpoint):
    from layercrit.columns import METRIC_COLUMNS

    folder = make_image_folder(tmp_path / "val", n_per_class=4, size=(64, 48))
    tables = {}
    for name, flags in (("exact", ["--exact"]), ("naive", ["--engine", "naive"])):
        code, _, err = run_cli(capsys, "run", "--model", checkpoint, "--arch", "timm:resnet10t", "--data", folder,
                               "--images", 8, "--batch-size", 4, "--resize", 40, "--crop", 32, "--trials", 2,
                               "--out", tmp_path / name, "--quiet", "--cache-dir", tmp_path / "cache", *flags)
        assert code == 0, err
        tables[name] = pd.read_csv(tmp_path / name / "results.csv")
    metrics = list(METRIC_COLUMNS)
    assert tables["exact"][metrics].equals(tables["naive"][metrics])
    assert tables["exact"].criticality.iloc[1:].max() > 0


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layercrit: error:"), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_model_is_a_one_line_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--model", "timm:resnet5O", "--data", "fashion-mnist", "--out", tmp_path)
    _assert_one_line_error(code, err, "unknown timm model", "resnet50")


def test_missing_data_is_a_one_line_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--model", "timm:resnet10t", "--no-pretrained",
                           "--data", tmp_path / "missing", "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "data not found")


def test_bad_checkpoint_keys_are_a_one_line_error(capsys, tmp_path):
    state = timm.create_model("resnet10t", num_classes=3).state_dict()
    state["head.weight"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "bad.pth")
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "bad.pth", "--arch", "timm:resnet10t",
                           "--data", "fashion-mnist", "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "missing: fc.weight", "unexpected: head.weight")


def test_unknown_layer_is_a_one_line_error(capsys, tmp_path, checkpoint):
    folder = make_image_folder(tmp_path / "val", n_per_class=2)
    code, _, err = run_cli(capsys, "run", "--model", checkpoint, "--arch", "timm:resnet10t", "--data", folder,
                           "--layers", "layer9.*", "--out", tmp_path / "o", "--no-cache")
    _assert_one_line_error(code, err, "'layer9.*' matches no module")


def test_class_count_mismatch_is_a_one_line_error(capsys, tmp_path, checkpoint):
    code, _, err = run_cli(capsys, "run", "--model", checkpoint, "--arch", "timm:resnet10t",
                           "--data", "fashion-mnist", "--images", 20, "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "labels go up to 9 but the model has 3 outputs")


def test_corrupt_image_is_a_one_line_error(capsys, tmp_path, checkpoint):
    folder = make_image_folder(tmp_path / "val", n_per_class=2)
    (folder / "cat" / "x.png").write_bytes(b"\x89PNG broken")
    code, _, err = run_cli(capsys, "run", "--model", checkpoint, "--arch", "timm:resnet10t", "--data", folder,
                           "--out", tmp_path / "o", "--no-cache")
    _assert_one_line_error(code, err, "corrupt image", "x.png")


def test_greyscale_images_feed_an_rgb_model(tmp_path, capsys, checkpoint):
    folder = tmp_path / "grey"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 40), 60 * i, dtype=np.uint8), mode="L").save(folder / c / f"{i}.png")
    code, _, err = run_cli(capsys, "run", "--model", checkpoint, "--arch", "timm:resnet10t", "--data", folder,
                           "--layers", "fc", "--trials", 1, "--out", tmp_path / "o", "--no-cache", "--quiet")
    assert code == 0, err


def test_run_prints_an_interval_that_would_leave_0_to_1_as_its_clipped_ends(capsys):
    from layercrit.cli import print_summary

    rows = pd.DataFrame({"model_id": "m", "layer": ["original", "model.fc", "model.fc", "model.conv1", "model.conv1"],
                         "trial": [0, 0, 1, 0, 1], "criticality": [0.0, 0.30, 0.9494, 0.50, 0.51],
                         "top1_acc": 90.0, "top5_acc": 99.0, "loss": 0.3, "n_images": 10, "n_skipped": 0})
    print_summary(rows)
    printed = capsys.readouterr().out
    # two trials: t(0.975, 1) = 12.7, so the fc's ± 4.12 would run from -3.5 to 4.7
    assert "model.fc                                 0.6247 [0.0000, 1.0000]" in printed
    assert "model.conv1                              0.5050 ± 0.0635" in printed
