"""Fitting the ecosystem: Hugging Face Hub specs and offline behaviour, the user's own model factories, torch
datasets, and the command line's conventions. No test touches the network: the Hub is a cache folder built here,
a local HTTP server, or a probe replaced by one that says "unreachable"."""

import errno
import http.server
import socket
import threading

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, TensorDataset

import layercrit
from layercrit import hub
from layercrit.columns import METRIC_COLUMNS
from layercrit.data import subset_indices
from layercrit.errors import LayercritError
from layercrit.models import build_architecture
from layercrit.resolve import resolve_model
from tests.conftest import TinyCNN

# ---------------------------------------------------------------- Hugging Face Hub, offline


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache of our own, the Hub online as far as the flag goes, and no probe result kept."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_probed", {})
    return cache


@pytest.fixture
def unreachable(monkeypatch):
    """The Hub does not answer; the calls to the probe are counted."""
    calls = []
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=hub.PROBE_TIMEOUT_S: calls.append(url) or False)
    return calls


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a network connection is refused and recorded: waiting on the network, or retrying,
    shows here as attempts, on a machine of any speed."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, "no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _cache_repo(cache, repo_id: str, files: dict) -> None:
    """Lay out files as huggingface_hub caches a download of ``repo_id`` at revision main."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)


def _cache_timm_repo(cache, repo_id: str, model) -> None:
    from timm.models._hub import save_for_hf

    staging = cache.parent / "staging"
    save_for_hf(model, str(staging), safe_serialization=True)
    _cache_repo(cache, repo_id, {name: (lambda path, name=name: path.write_bytes((staging / name).read_bytes()))
                                 for name in ("config.json", "model.safetensors")})


def test_unknown_timm_tag_lists_the_model_s_tags_without_going_online(monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("an unknown tag needs no network"))
    with pytest.raises(LayercritError) as info:
        resolve_model("timm:resnet50.nonexistent_tag")
    message = str(info.value)
    assert "no pretrained weights resnet50.nonexistent_tag" in message and "a1_in1k" in message
    assert "offline" not in message and "\n" not in message


def test_a_close_tag_is_suggested_first(monkeypatch):
    with pytest.raises(LayercritError, match=r"the tags of resnet50 are a1_in1k,"):
        resolve_model("timm:resnet50.a1_in1", pretrained=False)


def test_weights_not_cached_and_hub_unreachable_fail_at_once_saying_what_to_download_where(hf_cache, unreachable,
                                                                                           no_network):
    with pytest.raises(LayercritError) as info:
        resolve_model("timm:resnet10t.c3_in1k")
    message = str(info.value)
    assert len(unreachable) == 1 and no_network == [], "one probe, and no download tried after it"
    assert "huggingface.co does not answer" in message
    assert "hf download timm/resnet10t.c3_in1k" in message and f"into {hf_cache}" in message
    assert "--arch timm:resnet10t.c3_in1k" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_hf_hub_offline_flag_skips_the_probe(hf_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("HF_HUB_OFFLINE=1 must not probe"))
    with pytest.raises(LayercritError, match="HF_HUB_OFFLINE is set; on a machine that is online run `hf download"):
        resolve_model("timm:resnet10t.c3_in1k")


def test_cached_timm_weights_load_from_the_cache_alone_when_the_hub_is_unreachable(hf_cache, unreachable,
                                                                                   no_network):
    import huggingface_hub.constants

    torch.manual_seed(3)
    trained = timm.create_model("resnet10t")
    _cache_repo(hf_cache, "timm/resnet10t.c3_in1k",
                {"model.safetensors": lambda path: save_file(trained.state_dict(), str(path))})
    resolved = resolve_model("timm:resnet10t.c3_in1k")
    assert no_network == [], "no connection tried, so no minute of retries"
    loaded = resolved.model.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only while reading the cache


def test_hf_hub_spec_builds_the_repo_s_architecture_weights_and_preprocessing(hf_cache, unreachable):
    torch.manual_seed(4)
    trained = timm.create_model("resnet10t", num_classes=5)
    trained.pretrained_cfg = {**trained.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    _cache_timm_repo(hf_cache, "someone/tiny-resnet", trained)
    for spec in ("hf-hub:someone/tiny-resnet", "timm:hf-hub:someone/tiny-resnet"):
        resolved = resolve_model(spec)
        assert resolved.num_classes == 5 and resolved.spec == spec
        loaded = resolved.model.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())
        assert resolved.model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
        fresh = resolved.fresh().model
        assert fresh.fc.out_features == 5 and not torch.equal(fresh.fc.weight, trained.fc.weight)


def test_hf_hub_spec_without_a_cached_config_names_the_repo(hf_cache, unreachable):
    with pytest.raises(LayercritError, match=r"cannot download the config of hf-hub:someone/absent: .*"
                                             r"hf download someone/absent"):
        resolve_model("hf-hub:someone/absent", pretrained=False)


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    """What the Hub answers for a private repo without a token (and for one that does not exist)."""

    def do_HEAD(self):
        self.send_response(401)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_private_or_missing_repo_says_how_to_log_in(hf_cache, local_server, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", local_server)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", local_server)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        local_server + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(LayercritError) as info:
        resolve_model("hf-hub:someone/private-net")
    assert "no Hugging Face repo someone/private-net (or it is private)" in str(info.value)
    assert "HF_TOKEN" in str(info.value) and "\n" not in str(info.value)


def test_the_probe_counts_any_http_answer_and_gives_up_on_silence(local_server, monkeypatch):
    monkeypatch.setattr(hub, "_probed", {})
    assert hub.reachable(local_server + "/some/file")  # a 401 is an answer
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert not hub.reachable(f"http://127.0.0.1:{port}/x", timeout=1.0)  # nothing listens
    with socket.socket() as silent:  # listens, never answers: the probe returns once its timeout is over
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert not hub.reachable(f"http://127.0.0.1:{silent.getsockname()[1]}/x", timeout=0.5)


def test_a_bare_timm_name_suggests_its_source():
    with pytest.raises(LayercritError, match=r"unknown model spec 'resnet18' \(did you mean timm:resnet18\?\)"):
        resolve_model("resnet18", pretrained=False)


# ---------------------------------------------------------------- the user's own code


NETS = '''
import torch
from torch import nn

IMPORTED = True


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def build(num_classes=10):
    return Net(num_classes)


def build_trained(pretrained=True):
    net = Net()
    if pretrained:
        with torch.no_grad():
            net.fc.bias.fill_(7.0)
    return net
'''


@pytest.fixture
def nets_file(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def test_file_factory_with_pretrained_builds_the_trained_model_and_fresh_instances(nets_file):
    resolved = resolve_model(f"{nets_file}:build_trained")
    assert torch.all(resolved.model.model.fc.bias == 7.0)
    assert not torch.all(resolved.fresh().model.fc.bias == 7.0)
    assert resolved.preprocessing.in_chans == 1 and len(resolved.preprocessing.mean) == 1


def test_module_factory_as_the_architecture_of_a_checkpoint(nets_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(nets_file.parent))
    import nets

    trained = nets.build(num_classes=4)
    torch.save(trained.state_dict(), tmp_path / "ckpt.pth")
    resolved = resolve_model(str(tmp_path / "ckpt.pth"), arch="nets:build")
    assert resolved.num_classes == 4  # read from the checkpoint, passed to the factory
    assert torch.equal(resolved.model.model.fc.weight, trained.fc.weight)
    assert resolved.fresh().model.fc.out_features == 4


def test_factory_without_pretrained_asks_for_the_weights(nets_file):
    with pytest.raises(LayercritError, match=r"takes no 'pretrained' argument.*--model CKPT --arch .*nets.py:build"):
        resolve_model(f"{nets_file}:build")
    assert resolve_model(f"{nets_file}:build", pretrained=False).num_classes == 10


@pytest.mark.parametrize("spec, message", [
    ("{dir}/absent.py:build", "no Python file"),
    ("{dir}/nets.py:missing", "has no 'missing'"),
    ("{dir}/nets.py:IMPORTED", "is a bool, not a function or class"),
])
def test_factory_mistakes_are_one_line(nets_file, spec, message):
    with pytest.raises(LayercritError, match=message) as info:
        resolve_model(spec.format(dir=nets_file.parent), pretrained=False)
    assert "\n" not in str(info.value)


def test_code_named_in_a_file_the_user_did_not_write_is_never_imported(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef build():\n    pass\n")
    with pytest.raises(LayercritError, match="names Python code"):
        build_architecture(f"{tmp_path}/evil.py:build", pretrained=False)  # what a zoo manifest's arch goes through
    assert not marker.exists()


def test_cli_runs_a_factory_named_on_the_command_line(nets_file, tmp_path, capsys):
    from layercrit.cli import main

    code = main(["run", "--model", f"{nets_file}:build_trained", "--data", "fashion-mnist", "--images", "16",
                 "--trials", "1", "--layers", "fc", "--batch-size", "16", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "results.csv").is_file()
    assert "nets.py:build_trained" in capsys.readouterr().out


# ---------------------------------------------------------------- data in the API


QUICK = {"layers": "conv1,fc", "trials": 1, "batch_size": 16, "device": "cpu"}


def _metrics(df):
    return df[["layer", "trial", *METRIC_COLUMNS]].reset_index(drop=True)


def _same(a, b):
    pd.testing.assert_frame_equal(_metrics(a), _metrics(b), check_exact=False, rtol=1e-6)


class PILImages(Dataset):
    """What torchvision's datasets yield without a transform: (PIL image, int label)."""

    def __init__(self, images, labels):
        from PIL import Image

        self.items = [(Image.fromarray(image[0].numpy(), mode="L"), int(label))
                      for image, label in zip(images, labels, strict=True)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_a_dataset_gives_the_seeded_subset_as_every_other_data_source(tiny_model, tiny_data):
    images, labels = tiny_data
    chosen = subset_indices(len(labels), 20, seed=5)
    expected = layercrit.measure(tiny_model, (images[chosen], labels[chosen]), seed=5, **QUICK)
    _same(layercrit.measure(tiny_model, TensorDataset(images, labels), images=20, seed=5, **QUICK), expected)
    _same(layercrit.measure(tiny_model, PILImages(images, labels), images=20, seed=5, **QUICK), expected)


def test_a_data_loader_gives_its_own_first_images(tiny_model, tiny_data):
    images, labels = tiny_data
    loader = DataLoader(TensorDataset(images, labels), batch_size=7)
    rows = layercrit.measure(tiny_model, loader, images=20, **QUICK)
    _same(rows, layercrit.measure(tiny_model, (images[:20], labels[:20]), **QUICK))
    assert rows.n_images.iloc[0] == 20


def test_a_data_loader_that_cannot_batch_pil_images_says_what_to_do(tiny_model, tiny_data):
    with pytest.raises(LayercritError, match="ToTensor transform, or pass the Dataset itself"):
        layercrit.measure(tiny_model, DataLoader(PILImages(*tiny_data), batch_size=4), images=8, **QUICK)


def test_normalised_images_need_normalize_false_and_then_give_the_same_rows(tiny_model, tiny_data):
    images, labels = tiny_data
    normalised = (images.float() / 255 - 0.5) / 0.25
    with pytest.raises(LayercritError, match="pass normalize=False"):
        layercrit.measure(tiny_model, (normalised, labels), **QUICK)
    expected = layercrit.measure(tiny_model, tiny_data, **QUICK)
    _same(layercrit.measure(tiny_model, (normalised, labels), normalize=False, **QUICK), expected)
    _same(layercrit.measure(tiny_model, TensorDataset(normalised, labels), images=None, normalize=False,
                            seed=0, **QUICK).iloc[:1], expected.iloc[:1])  # a Dataset: same images, another order
    assert tiny_model.model.mean.flatten().tolist() == [0.5]  # the caller's model keeps its normalisation


def test_a_bare_module_takes_normalised_images_as_they_are(tiny_model, tiny_data):
    images, labels = tiny_data
    normalised = (images.float() / 255 - 0.5) / 0.25
    rows = layercrit.measure(tiny_model.model.model, (normalised, labels), fresh_model=TinyCNN, layers="conv1,fc",
                             trials=1, batch_size=16, device="cpu")
    _same(rows.assign(layer=rows.layer.radd("model.").where(rows.layer != "original", "original")),
          layercrit.measure(tiny_model, tiny_data, **QUICK))


def test_mean_and_std_wrap_a_bare_module_as_a_spec_s_wrapper_does(tiny_model, tiny_data):
    rows = layercrit.measure(tiny_model.model.model, tiny_data, fresh_model=TinyCNN, mean=(0.5,), std=(0.25,), **QUICK)
    _same(rows, layercrit.measure(tiny_model, tiny_data, **QUICK))
    with pytest.raises(LayercritError, match="mean and std together"):
        layercrit.measure(tiny_model, tiny_data, mean=(0.5,), **QUICK)


def test_an_option_measure_does_not_have_is_refused_naming_the_closest(tiny_model, tiny_data):
    naive = layercrit.measure(tiny_model, tiny_data, engine="naive", **QUICK)
    assert set(naive.engine) == {"naive"}
    with pytest.raises(LayercritError, match="no option 'engine_name' .did you mean engine"):
        layercrit.measure(tiny_model, tiny_data, engine_name="naive", **QUICK)


# ---------------------------------------------------------------- command-line conventions


def test_version_is_printed(capsys):
    from layercrit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"layercrit {layercrit.__version__}"


def test_help_and_import_load_no_torch():
    import subprocess
    import sys

    timing = subprocess.run([sys.executable, "-X", "importtime", "-m", "layercrit.cli", "--help"],
                            capture_output=True, text=True, check=True)
    modules = {line.split("|")[-1].strip() for line in timing.stderr.splitlines() if line.startswith("import time")}
    assert "layercrit.errors" in modules and not modules & {"torch", "pandas", "numpy", "timm"}
    lazy = subprocess.run([sys.executable, "-c", "import sys, layercrit; assert 'torch' not in sys.modules; "
                           "import layercrit.measurement.measure; "
                           "print(layercrit.measure.__module__, callable(layercrit.measure))"],
                          capture_output=True, text=True, check=True)
    assert lazy.stdout.split() == ["layercrit.measurement.measure", "True"]  # the function, loaded on first use


def test_results_are_written_and_read_as_json_records(tmp_path):
    import json

    from layercrit.results import read_table, write_table

    table = pd.DataFrame({"layer": ["original", "model.fc"], "trial": [0, 1], "criticality": [0.0, float("nan")]})
    write_table(table, tmp_path / "results.json")
    records = json.loads((tmp_path / "results.json").read_text())
    assert records == [{"layer": "original", "trial": 0, "criticality": 0.0},
                       {"layer": "model.fc", "trial": 1, "criticality": None}]
    pd.testing.assert_frame_equal(read_table(tmp_path / "results.json"), table)


def test_run_writes_results_json_next_to_csv_and_parquet(tiny_model, tiny_data, tmp_path):
    from layercrit.results import write_results

    rows = layercrit.measure(tiny_model, tiny_data, **QUICK)
    write_results(rows, tmp_path)
    from_json = pd.read_json(tmp_path / "results.json", orient="records")
    assert from_json.layer.tolist() == rows.layer.tolist()
    assert from_json.criticality.tolist() == pytest.approx(rows.criticality.tolist(), nan_ok=True)


# ---------------------------------------------------------------- the paper's extras: data seed, saved logits


def test_data_seed_chooses_the_images_and_leaves_the_resets_to_seed(tiny_model, tiny_data):
    images, labels = tiny_data
    dataset = TensorDataset(images, labels)
    chosen = subset_indices(len(labels), 20, seed=7)
    rows = layercrit.measure(tiny_model, dataset, images=20, seed=0, data_seed=7, **QUICK)
    _same(rows, layercrit.measure(tiny_model, (images[chosen], labels[chosen]), seed=0, **QUICK))
    other_resets = layercrit.measure(tiny_model, dataset, images=20, seed=7, **QUICK)
    assert rows.criticality.iloc[1:].tolist() != pytest.approx(other_resets.criticality.iloc[1:].tolist())
    _same(layercrit.measure(tiny_model, dataset, images=20, seed=3, data_seed=-1, **QUICK),
          layercrit.measure(tiny_model, dataset, images=20, seed=3, **QUICK))


def test_saved_logits_read_back_per_layer_and_trial_in_image_order(tmp_path):
    from layercrit.measurement.logits import LogitsWriter

    torch.manual_seed(0)
    clean, reset = torch.randn(10, 5) * 4, torch.randn(10, 5) * 4
    write = LogitsWriter(tmp_path / "logits")
    for start in (0, 4, 8):  # batch-outer, as the fast engine evaluates: every unit's batch, then the next batch
        part = slice(start, min(start + 4, 10))
        write(None, 0, part, clean[part])
        write("model.fc", 2, part, reset[part])
    logits = layercrit.load_logits(tmp_path / "logits")
    assert set(logits) == {("original", 0), ("model.fc", 2)}
    assert torch.equal(logits["original", 0], clean.half().float())
    assert torch.equal(logits["model.fc", 2], reset.half().float())
    assert {p.suffix for p in (tmp_path / "logits").iterdir()} == {".json", ".pos", ".val"}


def test_top_k_logits_keep_the_largest_values_and_their_classes(tmp_path):
    from layercrit.measurement.logits import LogitsWriter

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.0]])
    write = LogitsWriter(tmp_path, top_k=2)
    write("model.conv1", 0, torch.tensor([1, 0]), logits)  # positions need not be in order
    kept = layercrit.load_logits(tmp_path)["model.conv1", 0]
    assert kept.values.tolist() == [[5.0, 4.0], [3.0, 2.0]] and kept.indices.tolist() == [[0, 2], [1, 3]]


def test_logits_cut_short_by_a_kill_are_a_one_line_error(tmp_path):
    from layercrit.measurement.logits import LogitsWriter

    LogitsWriter(tmp_path)(None, 0, slice(0, 3), torch.zeros(3, 4))
    with open(tmp_path / "u00000.val", "ab") as f:
        f.write(b"\0\0")  # half an image more than the positions say
    with pytest.raises(LayercritError, match="killed while writing; rerun it"):
        layercrit.load_logits(tmp_path)
    with pytest.raises(LayercritError, match="not a logits folder"):
        layercrit.load_logits(tmp_path / "absent")


def test_save_logits_keeps_every_evaluation_and_agrees_with_the_rows(tmp_path):
    import layercrit
    from layercrit.cli import main

    out = tmp_path / "run"
    assert main(["run", "--model", "zoo:fmnist/baseline", "--data", "fashion-mnist", "--images", "40",
                 "--layers", "conv1,fc", "--trials", "2", "--device", "cpu", "--save-logits", "--out", str(out),
                 "--quiet"]) == 0
    rows = pd.read_csv(out / "results.csv")
    logits = layercrit.load_logits(out / "logits")
    assert set(logits) == {("original", 0), ("model.conv1", 0), ("model.conv1", 1), ("model.fc", 0), ("model.fc", 1)}
    clean = logits["original", 0]
    assert clean.shape == (40, 10)
    labels = layercrit.load_data("fashion-mnist", images=40).labels
    original = rows[rows.layer == "original"].iloc[0]
    # float16 logits: the top-1 of the kept logits is the row's to within an image of ties
    assert abs(100 * (clean.argmax(1) == labels).float().mean().item() - original.top1_acc) <= 100 / 40
    for _, row in rows[rows.layer != "original"].iterrows():
        kept = logits[row.layer, row.trial]
        assert abs((kept.argmax(1) == clean.argmax(1)).float().mean().item() - row.agreement) <= 1 / 40


def test_save_logits_of_the_sequential_design_are_indexed_by_image_in_the_pool(tmp_path):
    import layercrit

    rows = layercrit.measure("zoo:fmnist/baseline", "fashion-mnist", images=80, layers="fc", trials=2,
                             target_ci=0.4, max_trials=6, images_per_trial=10, save_logits=tmp_path / "logits",
                             device="cpu")
    logits = layercrit.load_logits(tmp_path / "logits")
    measured = rows[rows.layer != "original"]
    assert {(layer, trial) for layer, trial in zip(measured.layer, measured.trial, strict=True)} <= set(logits)
    assert all(len(logits[row.layer, row.trial]) == row.n_images for _, row in measured.iterrows())


def test_progress_bars_are_on_where_someone_watches_and_off_in_logs(monkeypatch):
    import io

    from layercrit.measurement.prepare import interactive

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    assert interactive()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not interactive()
