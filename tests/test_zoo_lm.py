"""The language-model zoo: training (resumable, a save_pretrained folder per member) and the shipped members."""

import platform

import pytest
import torch
import yaml

from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")

from layercrit.data.text import load_text  # noqa: E402
from layercrit.resolve import resolve_model  # noqa: E402
from layercrit.training_lm import perplexity  # noqa: E402
from layercrit.zoo import lm  # noqa: E402

TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": lm.SEQ_LEN,
        "activation_function": "gelu"}
RECIPES = [
    {"id": "a", "method": "causal_lm", "display": "a", "arch": TINY,
     "hyperparameters": {"steps": 4, "batch_size": 2, "lr": 1e-3, "warmup": 1, "weight_decay": 0.0, "dropout": 0.0,
                         "precision": "fp32"}},
    {"id": "b", "method": "causal_lm", "display": "b", "arch": TINY,
     "hyperparameters": {"steps": 4, "batch_size": 2, "lr": 1e-3, "warmup": 1, "weight_decay": 0.1, "dropout": 0.1,
                         "precision": "fp32"}},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-zoo")
    lm.train_zoo(out, recipes=RECIPES, device="cpu", log=lambda _: None)
    return out


@pytest.mark.slow
def test_each_member_is_a_save_pretrained_folder_with_the_perplexity_of_its_stored_weights(trained, monkeypatch):
    monkeypatch.setenv("LAYERCRIT_LM_ZOO", str(trained))
    records = {r["id"]: r for r in yaml.safe_load((trained / "manifest.yaml").read_text())["models"]}
    assert set(records) == {"a", "b"}
    model = transformers.AutoModelForCausalLM.from_pretrained(trained / "b")
    assert model.config.resid_pdrop == 0.1 and model.dtype == torch.float16
    resolved = resolve_model("zoo:lm/b")
    assert resolved.spec == "zoo:lm/b" and resolved.metadata["perplexity"] == records["b"]["perplexity"]
    windows = lm.eval_windows(resolved.tokenizer)
    assert perplexity(resolved.model, windows) == pytest.approx(records["b"]["perplexity"], abs=1e-3)
    assert records["a"]["python"] == platform.python_version() and records["a"]["eval_windows"] == len(windows)


@pytest.mark.slow
def test_a_trained_member_is_skipped_and_others_keep_their_records(trained):
    lines = []
    lm.train_zoo(trained, recipes=RECIPES, methods=["a"], device="cpu", log=lines.append)
    assert lines == ["a            already trained (same recipe and seed); --force to train it again"]
    assert [r["id"] for r in yaml.safe_load((trained / "manifest.yaml").read_text())["models"]] == ["a", "b"]


def test_zoo_train_refuses_an_unknown_member(capsys, tmp_path):
    code, _, err = run_cli(capsys, "zoo", "train", "lm", "--methods", "nope", "--out", tmp_path)
    assert code == 2 and "unknown language-model zoo member 'nope'" in err


shipped = pytest.mark.skipif(not (lm.zoo_dir() / lm.MANIFEST).is_file(), reason="no language-model zoo shipped")


@shipped
def test_the_shipped_zoo_has_three_members_differing_only_in_training_method():
    records = lm.entries()
    assert len(records) >= 3
    archs = {str(sorted(r["arch"].items())) for r in records}
    assert len(archs) == 1
    assert all(r["perplexity"] > 1 for r in records)
    assert sum(f.stat().st_size for f in lm.zoo_dir().rglob("*") if f.is_file()) < 12e6


@shipped
@pytest.mark.slow
def test_the_shipped_baseline_has_the_perplexity_of_its_manifest_on_this_python():
    record = next(r for r in lm.entries() if r["id"] == "baseline")
    if record["python"] != platform.python_version():
        pytest.skip(f"the zoo read the standard library of Python {record['python']}; this is "
                    f"{platform.python_version()}")
    resolved = resolve_model("zoo:lm/baseline")
    data = load_text("python-stdlib", resolved.tokenizer, seq_len=lm.SEQ_LEN)
    assert perplexity(resolved.model, data.images["input_ids"]) == pytest.approx(record["perplexity"], abs=1e-3)


@pytest.mark.slow
def test_demo_lm_skips_every_block_of_every_member_and_writes_the_proxies(trained, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LAYERCRIT_LM_ZOO", str(trained))
    code, out, err = run_cli(capsys, "demo", "--task", "lm", "--out", tmp_path, "--windows", 512, "--quiet")  # skip: no window twice
    assert code == 0, err
    import pandas as pd

    layers = pd.read_csv(tmp_path / "layers.csv")
    assert list(layers.layer) == ["transformer.h.0", "transformer.h.1"] * 2
    assert {"block_influence", "angular_distance", "delta_nll", "perplexity"} <= set(layers.columns)
    proxies = pd.read_csv(tmp_path / "proxies.csv")
    assert set(proxies.quantity) == {"criticality", "delta_nll"} and (proxies.n == 2).all()
    assert (tmp_path / "heatmap.png").is_file() and "Spearman rho" in out
