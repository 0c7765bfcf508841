"""The paper's ResNet-50 zoo: every record builds, every checkpoint layout loads strictly, downloads fail clearly.

No test touches the network: the downloader is replaced by one that fails as it would offline, and the torch hub
cache is a temporary folder.
"""

import argparse
import hashlib
import re
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from layercrit import cli, zoo
from layercrit.errors import LayercritError
from layercrit.measurement.layers import select_layers
from layercrit.models import Normalized, build_architecture, load_strict
from layercrit.sweeps.sweep import load_config
from layercrit.zoo import paper

REAL_FETCH = paper._fetch
ENTRIES = paper.entries()
IDS = [entry["id"] for entry in ENTRIES]
CONFIG = Path(__file__).parents[1] / "configs" / "paper_r50.yaml"

# The categories of the paper's code/r50_categories.json and how many models each holds.
PAPER_CATEGORIES = {"baseline": 1, "training_recipes": 10, "augmentation": 18, "freezing": 1,
                    "adversarial_training": 15, "contrastive": 6}


# ---------------------------------------------------------------- how the real checkpoints look
# Written out from the publishers' formats, independently of the registry's rules: each takes the architecture's
# state dict and returns what the file holds (for models of several files, only that file's part).


def _fc(state):
    return {k: v for k, v in state.items() if k.startswith("fc.")}


def _trunk(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _training_checkpoint(state):  # a DataParallel model saved by an ImageNet training script
    return {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90, "best_acc1": torch.tensor(77.0)}


def _robustness(state):  # madrylab/robustness: AttackerModel(model, attacker(model)) with an InputNormalize
    model = {f"module.model.{k}": v for k, v in state.items()}
    model.update({f"module.attacker.model.{k}": v for k, v in state.items()})
    model.update({"module.normalizer.new_mean": torch.rand(3, 1, 1), "module.normalizer.new_std": torch.rand(3, 1, 1),
                  "module.attacker.normalize.new_mean": torch.rand(3, 1, 1),
                  "module.attacker.normalize.new_std": torch.rand(3, 1, 1)})
    return {"model": model, "optimizer": {}, "schedule": None, "epoch": 90}


def _auxbn(state):  # timm's SplitBatchNorm2d: every BatchNorm keeps its auxiliary twins in aux_bn.N
    checkpoint = {f"module.{k}": v for k, v in state.items()}
    for key, value in state.items():
        module, _, tensor = key.rpartition(".")
        if re.search(r"(^|\.)bn\d$|downsample\.1$", module):
            checkpoint[f"module.{module}.aux_bn.0.{tensor}"] = value.clone()
    return {"state_dict": checkpoint}


_SIMCLR_BLOCK = {"conv1": "net.0", "bn1": "net.1.0", "conv2": "net.2", "bn2": "net.3.0", "conv3": "net.4",
                 "bn3": "net.5.0", "downsample.0": "projection.shortcut", "downsample.1": "projection.bn.0"}


def _simclrv2_tf(state):  # Separius/SimCLRv2-Pytorch: a ModuleList of stem + stages of blocks, plus the head
    resnet = {}
    for key, value in state.items():
        block = re.match(r"layer(\d)\.(\d+)\.(.+)\.(\w+)$", key)
        if block:
            stage, index, module, tensor = block.groups()
            resnet[f"net.{stage}.blocks.{index}.{_SIMCLR_BLOCK[module]}.{tensor}"] = value
        elif key.startswith("conv1."):
            resnet["net.0.0." + key.removeprefix("conv1.")] = value
        elif key.startswith("bn1."):
            resnet["net.0.1.0." + key.removeprefix("bn1.")] = value
        else:
            resnet[key] = value
    return {"resnet": resnet, "head": {"layers.0.weight": torch.zeros(8, 8)}}


def _swav_backbone(state):
    checkpoint = {f"module.{k}": v for k, v in _trunk(state).items()}
    checkpoint.update({"module.projection_head.0.weight": torch.zeros(16, 2048),
                       "module.projection_head.1.running_mean": torch.zeros(16),
                       "module.prototypes.weight": torch.zeros(30, 16)})
    return checkpoint


def _linear_head(state):  # a linear-evaluation script's RegLog/LinearClassifier wrapped in DataParallel
    return {"state_dict": {f"module.linear.{k.removeprefix('fc.')}": v for k, v in _fc(state).items()},
            "epoch": 100, "best_acc": 75.0}


CHECKPOINT_LAYOUTS = {
    "plain": dict,
    "checkpoint": _training_checkpoint,
    "robustness": _robustness,
    "auxbn": _auxbn,
    "simclrv2_tf": _simclrv2_tf,
    "trunk": _trunk,
    "swav_backbone": _swav_backbone,
    "linear_head": _linear_head,
}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Copying and comparing 100 MB state dicts is memory-bound: more threads only contend on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache, and a downloader that fails as it does without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def unreachable(file, path):
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(paper, "_fetch", unreachable)


_ARCHITECTURES: dict[str, torch.nn.Module] = {}


def architecture(arch: str) -> torch.nn.Module:
    """One randomly initialised instance per architecture, with BatchNorm statistics unlike their defaults."""
    if arch not in _ARCHITECTURES:
        torch.manual_seed(0)
        module = build_architecture(arch, pretrained=False)[0]
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                if name.endswith(("running_mean", "running_var")):
                    buffer.uniform_(0.5, 1.5)
        _ARCHITECTURES[arch] = module
    return _ARCHITECTURES[arch]


_STATES: dict[str, dict[str, torch.Tensor]] = {}


def random_state(arch: str) -> dict[str, torch.Tensor]:
    """Values for every tensor of the architecture, none equal to what a fresh instance holds."""
    if arch not in _STATES:
        torch.manual_seed(1)
        _STATES[arch] = {k: torch.randn_like(v) if v.is_floating_point() else v + 7
                         for k, v in architecture(arch).state_dict().items()}
    return _STATES[arch]


def serve_in_memory(monkeypatch, checkpoints: dict[Path, object]) -> None:
    """Cached files whose content is ``checkpoints[path]`` (skips writing and reading 100 MB per model)."""
    for path in checkpoints:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    monkeypatch.setattr(paper, "_read", lambda path, url, trust: checkpoints[path])


# ---------------------------------------------------------------- the registry


def test_zoo_holds_the_papers_models_by_category():
    counts = {category: sum(e["category"] == category for e in ENTRIES) for category in PAPER_CATEGORIES}
    assert counts == PAPER_CATEGORIES
    assert len(set(IDS)) == len(IDS)


def test_every_model_except_the_one_left_out_of_the_papers_figures_has_a_reported_accuracy():
    missing = [e["id"] for e in ENTRIES if e["accuracy"] is None]
    assert missing == ["resnet50_frozen_random"]
    assert all(40 < e["accuracy"] < 90 for e in ENTRIES if e["accuracy"] is not None)


def test_two_models_never_share_a_cache_file_for_different_downloads():
    url_of: dict[str, str] = {}
    for model_id in IDS:
        for file in paper.weight_files(model_id):
            assert url_of.setdefault(file.cache_name, file.url) == file.url, file.cache_name


def test_weights_published_by_timm_and_torchvision_are_checked_against_their_sha256():
    library_sources = [e["id"] for e in ENTRIES if e["source"].startswith(("timm:", "torchvision:"))]
    assert len(library_sources) == 11
    for model_id in library_sources:
        (file,) = paper.weight_files(model_id)
        assert file.sha256 and file.sha256 in file.cache_name


def test_sweep_config_lists_every_zoo_model_with_its_record_and_the_papers_protocol():
    config = load_config(CONFIG)
    listed = [{"id": m.id, "spec": m.spec, **m.metadata} for m in config.models]
    assert listed == [{k: e[k] for k in ("id", "spec", "category", "display", "accuracy")} for e in ENTRIES]
    assert (config.images, config.trials, config.reset, config.layers) == (10_000, 3, ("rerandomize",), "conv,linear")


def _papers_layers() -> list[str]:
    """The 54 layers of the paper's raw-results/results.csv, in its order: every convolution, then the classifier."""
    names = ["model.conv1"]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            names += [f"model.layer{stage}.{block}.conv{i}" for i in (1, 2, 3)]
            names += [f"model.layer{stage}.{block}.downsample.0"] if block == 0 else []
    return names + ["model.fc"]


@pytest.mark.parametrize("model_id", ["tv_resnet50", "tv2_resnet50"])  # a timm and a torchvision ResNet-50
def test_sweep_config_layers_of_a_zoo_model_are_the_papers_54_layers(model_id):
    layers = select_layers(paper.resolve(model_id, pretrained=False).model, load_config(CONFIG).layers)
    assert layers == _papers_layers()


def test_unknown_model_id_suggests_close_ids():
    with pytest.raises(LayercritError, match=r"unknown model 'robust_resnet50_l2_eps33'.*did you mean .*robust_resnet50_l2_eps3"):
        paper.resolve("robust_resnet50_l2_eps33", pretrained=False)


# ---------------------------------------------------------------- every entry


@pytest.mark.parametrize("model_id", IDS)
def test_every_entry_resolves_to_its_architecture_without_weights(model_id):
    entry = ENTRIES[IDS.index(model_id)]
    resolved = zoo.resolve(f"zoo:paper/{model_id}", pretrained=False)
    assert isinstance(resolved.model, Normalized)
    assert type(resolved.model.model) is type(architecture(entry["arch"]))
    assert resolved.num_classes == 1000
    assert resolved.spec == entry["spec"]
    assert (resolved.preprocessing.mean, resolved.preprocessing.std) == (entry["mean"], entry["std"])
    assert resolved.metadata["category"] == entry["category"] and resolved.metadata["pretrained"] is False


@pytest.mark.parametrize("model_id", IDS)
def test_every_entrys_checkpoint_layout_loads_strictly_after_remapping(model_id, monkeypatch):
    arch = ENTRIES[IDS.index(model_id)]["arch"]
    state = random_state(arch)
    files = paper.weight_files(model_id)
    serve_in_memory(monkeypatch, {file.path: CHECKPOINT_LAYOUTS[file.layout.name](state) for file in files})
    module = architecture(arch)
    load_strict(module, paper.load_weights(model_id), source=model_id)
    assert all(torch.equal(value, state[key]) for key, value in module.state_dict().items())


def test_every_layout_of_the_registry_has_its_checkpoint_format_in_these_tests():
    used = {file.layout.name for model_id in IDS for file in paper.weight_files(model_id)}
    assert used <= CHECKPOINT_LAYOUTS.keys()


# ---------------------------------------------------------------- end to end, from files on disk


def test_pretrained_model_reads_its_files_from_the_torch_hub_cache_and_merges_them():
    state = random_state("timm:resnet50")
    for file in paper.weight_files("resnet50_dino"):
        file.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(CHECKPOINT_LAYOUTS[file.layout.name](state), file.path)
    resolved = paper.resolve("resnet50_dino")  # offline: only the cache can have served them
    assert all(torch.equal(v, state[k]) for k, v in resolved.model.model.state_dict().items())
    assert resolved.metadata["display"] == "DINOv1" and resolved.metadata["pretrained"] is True
    fresh = resolved.fresh().model
    assert type(fresh) is type(resolved.model.model)
    assert not torch.equal(fresh.fc.weight, resolved.model.model.fc.weight)


def test_checkpoint_that_misses_architecture_keys_is_refused_naming_them(monkeypatch):
    state = random_state("timm:resnet50")
    (file,) = paper.weight_files("resnet50_prime")
    serve_in_memory(monkeypatch, {file.path: _training_checkpoint(_trunk(state))})
    with pytest.raises(LayercritError, match=r"does not match the architecture: missing: fc\.weight, fc\.bias"):
        paper.resolve("resnet50_prime")


def test_checkpoint_holding_pickled_objects_needs_trust(tmp_path):
    (file,) = paper.weight_files("resnet50_pixmix_90ep")
    file.path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"module.fc.bias": torch.ones(3)}, "args": argparse.Namespace(lr=0.1)}, file.path)
    with pytest.raises(LayercritError, match=r"pickled Python objects.*if you trust https://drive\.google\.com/uc\?id=.*trust_checkpoint=True"):
        paper.load_weights("resnet50_pixmix_90ep")
    assert list(paper.load_weights("resnet50_pixmix_90ep", trust_checkpoint=True)) == ["fc.bias"]


def test_unreadable_cached_file_says_to_delete_it():
    (file,) = paper.weight_files("resnet50_prime")
    file.path.parent.mkdir(parents=True, exist_ok=True)
    file.path.write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(LayercritError, match=rf"cannot read {re.escape(str(file.path))} .*delete it to download .*zenodo"):
        paper.load_weights("resnet50_prime")


# ---------------------------------------------------------------- downloads


def test_offline_error_names_the_url_and_the_cache_path_to_put_the_file_in(tmp_path):
    url = "https://huggingface.co/madrylab/robust-imagenet-models/resolve/main/resnet50_l2_eps3.ckpt"
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50_l2_eps3.ckpt"
    with pytest.raises(LayercritError) as error:
        paper.resolve("robust_resnet50_l2_eps3")
    message = str(error.value)
    assert "\n" not in message
    assert f"offline, download {url} to {path}" in message and "Network is unreachable" in message


def test_google_drive_weights_without_gdown_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(paper, "_fetch", REAL_FETCH)
    monkeypatch.setitem(sys.modules, "gdown", None)  # import gdown fails
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50_augmix_180ep.pth"
    with pytest.raises(LayercritError, match=rf"pip install gdown.*download https://drive\.google\.com/uc\?id=\S+ to {re.escape(str(path))}"):
        paper.download("resnet50_augmix_180ep")


def serve_file_url(monkeypatch, tmp_path, sha256) -> tuple[Path, paper.WeightFile]:
    """A model whose one weight file is published at a file:// URL, fetched by the real downloader."""
    source = tmp_path / "published.pth"
    torch.save({"fc.bias": torch.arange(3.0)}, source)
    file = paper.WeightFile(url=source.as_uri(), cache_name="published.pth", sha256=sha256(source.read_bytes()),
                            layout=paper.Layout(name="plain"))
    monkeypatch.setattr(paper, "_fetch", REAL_FETCH)
    monkeypatch.setattr(paper, "weight_files", lambda model_id: [file])
    return source, file


def test_download_matching_its_sha256_prefix_lands_in_the_cache(monkeypatch, tmp_path):
    source, file = serve_file_url(monkeypatch, tmp_path, sha256=lambda data: hashlib.sha256(data).hexdigest()[:8])
    assert paper.download("tv_resnet50") == [file.path]
    assert file.path.read_bytes() == source.read_bytes()


def test_download_not_matching_its_sha256_prefix_is_refused_and_not_kept(monkeypatch, tmp_path):
    _, file = serve_file_url(monkeypatch, tmp_path, sha256=lambda data: "00000000")
    with pytest.raises(LayercritError, match=r"does not match its sha256 prefix 00000000"):
        paper.download("tv_resnet50")
    assert not file.path.exists()


# ---------------------------------------------------------------- layouts


def test_layout_that_maps_two_keys_onto_one_is_refused():
    layout = paper.Layout(name="clash", strip=("module.",))
    with pytest.raises(LayercritError, match=r"layout 'clash' maps two keys of ckpt onto 'fc\.bias'"):
        layout.apply({"module.fc.bias": torch.ones(1), "fc.bias": torch.ones(1)}, source="ckpt")


def test_layout_names_the_key_it_expected_when_the_file_holds_no_state_dict():
    layout = paper.Layout(name="robustness", key=("model",))
    with pytest.raises(LayercritError, match=r"ckpt holds no state dict of tensors where layout 'robustness' expects one \(under model\)"):
        layout.apply({"model": {"epoch": 3}}, source="ckpt")


# ---------------------------------------------------------------- command line


def test_zoo_download_reports_each_model_and_fails_when_one_cannot_be_fetched(monkeypatch, capsys, tmp_path):
    state = random_state("timm:resnet50")
    (file,) = paper.weight_files("resnet50_prime")
    serve_in_memory(monkeypatch, {file.path: _training_checkpoint(state)})
    assert cli.main(["zoo", "download", "resnet50_prime", "robust_resnet50_l2_eps3"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ok      resnet50_prime"
    assert lines[1].startswith("failed  robust_resnet50_l2_eps3: cannot download")
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50_l2_eps3.ckpt") in lines[1]
    assert lines[2] == "1 of 2 models ready"


def test_zoo_list_shows_the_papers_models(capsys):
    assert cli.main(["zoo", "list", "--zoo", "paper"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == IDS
